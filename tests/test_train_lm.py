"""train_lm.py: every PE × λ mode × regime learns; constrained attention keeps its inertia;
kill-and-resume and 2-process DDP reproduce the plain run; the loaders of data/text.py read small
archives of the real formats; every bad input is one sentence, exit 2, nothing written."""
import bz2
import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ode_attention
import regimes
import train_lm
import training
from data import text

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--warmup", "0", "--eval-tokens", "64", "--probe-batch", "2", "--device", "cpu", "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def english():
    """~60 kB of real English: the start of the Python Language Reference that ships with Python."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))[:60000].encode("utf-8")


@pytest.fixture(scope="module")
def text_file(english, tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "english.txt"
    p.write_bytes(english)
    return p


def cli(argv):
    """train_lm's command line, in-process: (exit code)."""
    return training.run_cli(train_lm.main, [str(a) for a in argv])


# -- every variant learns ---------------------------------------------------------------------------
LAMS = {"off": (0.0, "identity"), "identity": (-0.1, "identity"), "softplus-diag": (0.05, "softplus-diag")}


@pytest.mark.parametrize("pe,lam,regime", list(itertools.product(train_lm.PES, LAMS, train_lm.REGIMES)))
def test_a_few_steps_reduce_the_loss(pe, lam, regime, english):
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, d_model=16, n_layers=1, n_heads=2, seq_len=16, pe=pe, lam=LAMS[lam][0],
               lam_mode=LAMS[lam][1], regime=regime, mlp_ratio=2.0, dropout=0.0, cutoffs="",
               lr=1e-2, beta2=0.99, weight_decay=0.0)
    model = train_lm.build_lm(cfg)
    opt = train_lm.make_optimizer(model, cfg, torch.device("cpu"))
    tokens = np.frombuffer(english, dtype=np.uint8)
    rt = training.Runtime(device=torch.device("cpu"))
    batches = text.batch_fn_for(tokens, seq_len=16, global_batch=16, micro=16, rt=rt, seed=0)
    held_out = batches(10_000, 0)
    with torch.no_grad():
        before = model(*held_out).item()
    for step in range(30):
        loss = model(*batches(step, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(*held_out).item()
    assert np.isfinite(after) and after < before - 0.5, (before, after)


@pytest.mark.parametrize("regime,n_neg", [("divergent", 0), ("intermediate", 4), ("convergent", 8)])
def test_constrained_attention_keeps_its_inertia_after_training(regime, n_neg, english):
    torch.manual_seed(1)
    cfg = dict(vocab_size=256, d_model=8, n_layers=2, n_heads=2, seq_len=16, pe="rope", lam=0.0,
               lam_mode="identity", regime=regime, mlp_ratio=2.0, dropout=0.0, cutoffs="",
               lr=5e-2, beta2=0.99, weight_decay=0.0)
    model = train_lm.build_lm(cfg)
    start = [p.detach().clone() for p in model.blocks[0].attn.parameters()]
    opt = train_lm.make_optimizer(model, cfg, torch.device("cpu"))
    rt = training.Runtime(device=torch.device("cpu"))
    batches = text.batch_fn_for(np.frombuffer(english, dtype=np.uint8), seq_len=16, global_batch=8,
                                    micro=8, rt=rt, seed=0)
    for step in range(15):
        loss = model(*batches(step, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(model.blocks[0].attn.parameters(), start))
    assert moved > 1e-2                                            # the optimiser really moved it
    for block in model.blocks:
        att = block.attn
        W, A = att.W_form().double().detach(), att.A_form().double().detach()
        assert regimes.inertia(regimes.sym(W)) == (8, 0, 0)         # W_sym ≻ 0
        assert regimes.inertia(regimes.sym(A)) == (8 - n_neg, n_neg, 0)
        m = att.interaction()
        # the realised maps give exactly W and A:  Q Kᵀ = W,  A Vᵀ = W
        torch.testing.assert_close(m["Q"] @ m["K"].T, W, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(A @ m["V"].T, W, rtol=1e-4, atol=1e-5)
    # and in float32, as the forward pass computes them (what summary.json records)
    real = training.realised_inertia(model)
    assert [r["module"] for r in real] == [f"blocks.{i}.attn.{f}" for i in (0, 1) for f in ("W_form", "A_form")]
    assert all(r["kept"] and r["dtype"] == "float32" for r in real)
    assert [r["prescribed"] for r in real[:2]] == [(8, 0, 0), (8 - n_neg, n_neg, 0)]


# -- the command line: outputs, resume, DDP -----------------------------------------------------------
def test_run_writes_every_output_and_the_checkpoint_rebuilds_the_model(text_file, tmp_path):
    out = tmp_path / "run"
    assert cli(["--data", text_file, "--out", out, "--steps", 6, "--eval-every", 3, "--lam", -0.1, *TINY]) == 0
    for name in ("config.json", "versions.json", "metrics.csv", "loss.png", "ckpt.pt", "probe.csv",
                 "probe.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["bpb"] == pytest.approx(summary["val"]["loss"] / np.log(2))
    assert len(summary["lam"]) == 1 and len(summary["lam"][0]) == 2   # λ per head, per layer
    assert summary["inertia"] == []                                  # a free model has no constrained form
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert {(r["mode"], int(r["layer"])) for r in rows} == {(m, l) for m in ("full", "attention-only") for l in (0, 1)}
    # layer 0 (the embeddings) is the same for both modes
    first = {(r["mode"], r["metric"]): float(r["mean"]) for r in rows if r["layer"] == "0"}
    assert first[("full", "norm")] == first[("attention-only", "norm")]
    state = training.load_checkpoint(out)
    cfg = state["config"]
    assert {"d_model", "n_layers", "n_heads", "pe", "attn_pe", "lam", "lam_mode", "regime"} <= set(cfg)
    # the lead's regimes.py rebuilds one layer from the config and the state dict alone
    block = ode_attention.Block(cfg["d_model"], cfg["n_heads"], mlp_ratio=cfg["mlp_ratio"], causal=True,
                                pe=cfg["attn_pe"], lam=cfg["lam"], lam_mode=cfg["lam_mode"], regime=cfg["regime"])
    block.load_state_dict({k[len("blocks.0."):]: v for k, v in state["model"].items() if k.startswith("blocks.0.")})
    # the final evaluation covers the whole validation split (--eval-tokens caps only the periodic ones)
    model = train_lm.build_lm(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    val = np.frombuffer(text_file.read_bytes(), np.uint8)
    val = text.split_90_5_5(val)[1]
    with torch.no_grad():
        full = train_lm.evaluate(model, val, seq_len=16, batch=7, rt=training.Runtime(device=torch.device("cpu")))
    assert summary["val"]["loss"] == pytest.approx(full, rel=1e-5)
    assert len(val) // 16 * 16 > 64                                 # more than the periodic 64 tokens
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "metrics.csv")) if r["split"] == "val" and r["metric"] == "bpb"]
    assert steps == [3, 6]


def _train_rows(run):
    return [(r["step"], r["value"]) for r in training.RunDir(run).read()
            if r["split"] == "train" and r["metric"] == "loss"]


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons need the same reduction order everywhere: the killed subprocess
    runs with OMP_NUM_THREADS=1, so the in-process runs must use one thread too (CI found a
    1-ulp difference at step 7 with 2 threads in-process)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_kill_and_resume_gives_the_losses_of_an_uninterrupted_run(text_file, tmp_path, one_thread):
    # --log-every 4: a stop between two log rows must not leave a row an unbroken run has not
    common = ["--data", text_file, "--steps", 100, "--eval-every", 0, "--dropout", 0.1, *TINY, "--log-every", 4]
    assert cli([*common, "--out", tmp_path / "full"]) == 0
    # a real process, killed by a real SIGTERM somewhere after its third step
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lm.py"), *map(str, common), "--out", str(run)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(_train_rows(run)) < 1 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in err
    stopped = training.load_checkpoint(run)["step"]
    assert 3 <= stopped < 100
    assert cli(["--resume", run]) == 0                              # every flag from the run's config.json
    assert _train_rows(run) == _train_rows(tmp_path / "full")      # bit for bit, every step
    val = lambda r: json.loads((r / "summary.json").read_text())["val"]
    assert val(run) == val(tmp_path / "full")


def test_torchrun_two_processes_match_one(text_file, tmp_path):
    common = ["--data", str(text_file), "--steps", "4", "--eval-every", "0", *TINY]
    assert cli([*common, "--out", tmp_path / "one"]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train_lm.py"), *common, "--out", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    # the gradient of the global mean is the same, so the trained weights are too
    sa, sb = training.load_checkpoint(tmp_path / "one")["model"], training.load_checkpoint(tmp_path / "two")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)


# -- data loaders on small archives of the real formats ------------------------------------------------
def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


WIKI_TRAIN = (" \n = Valkyria Chronicles = \n \n The game began development in 2010 . \n"
              " It is the third game in the series . The game is a <unk> game . \n") * 20
WIKI_VALID = " \n = Tower Building = \n The tower is a game . \n"
WIKI_TEST = " \n The zebra began the series . \n"


def test_loaders_read_the_real_archive_formats(english, tmp_path):
    xml = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/">\n<page>\n<title>AaA</title>\n' + english[:3900]
    enwik8 = text.load_zip(make_zip(tmp_path / "enwik8.zip", {"enwik8": xml}))
    assert (enwik8.name, enwik8.metric, enwik8.vocab_size) == ("enwik8", "bpc", 256)
    n5 = len(xml) // 20                                   # 90 / 5 / 5, in order
    assert bytes(enwik8.train) + bytes(enwik8.val) + bytes(enwik8.test) == xml
    assert len(enwik8.val) == len(enwik8.test) == n5
    text8 = b" anarchism originated as a term of abuse first used against early working class radicals" * 50
    t8 = text.load_zip(make_zip(tmp_path / "text8.zip", {"text8": text8}))
    assert t8.name == "text8" and bytes(t8.test) == text8[-(len(text8) // 20):]
    wt = text.load_zip(make_zip(tmp_path / "wikitext-103-v1.zip", {
        "wikitext-103/wiki.train.tokens": WIKI_TRAIN, "wikitext-103/wiki.valid.tokens": WIKI_VALID,
        "wikitext-103/wiki.test.tokens": WIKI_TEST}), cache_dir=tmp_path / "cache")
    assert wt.metric == "ppl" and wt.itos[0] == "<eos>"   # most frequent first: one <eos> per line
    counts = [WIKI_TRAIN.split().count(w) for w in wt.itos if w != "<eos>"]
    assert counts == sorted(counts, reverse=True)
    decode = lambda ids: " ".join(wt.itos[i] for i in ids)
    assert decode(wt.val) == "<eos> = <unk> <unk> = <eos> The <unk> is a game . <eos>"
    assert decode(wt.test[:4]) == "<eos> The <unk> began"
    again = text.load_wikitext(tmp_path / "wikitext-103-v1.zip", cache_dir=tmp_path / "cache")
    assert np.array_equal(again.train, wt.train) and again.itos == wt.itos and len(os.listdir(tmp_path / "cache")) == 1
    # a .bz2 text file (the shared enwiki sample's format) is decompressed transparently
    (tmp_path / "s.xml.bz2").write_bytes(bz2.compress(xml))
    assert bytes(np.concatenate([c for c in text.split_90_5_5(np.frombuffer(xml, np.uint8))])) == xml
    local = text.load_corpus(str(tmp_path / "s.xml.bz2"), tmp_path / "cache")
    assert bytes(local.train) == bytes(enwik8.train) and local.metric == "bpb"


def test_wikitext_trains_with_the_adaptive_softmax(tmp_path):
    path = make_zip(tmp_path / "wikitext-103-v1.zip", {
        "wikitext-103/wiki.train.tokens": WIKI_TRAIN * 3, "wikitext-103/wiki.valid.tokens": WIKI_VALID * 6,
        "wikitext-103/wiki.test.tokens": WIKI_TEST * 8})
    out = tmp_path / "run"
    assert cli(["--data", path, "--cutoffs", "6,12", "--out", out, "--steps", 8, "--lr", 0.02,
                "--cache-dir", tmp_path / "cache", *TINY]) == 0                # not the user's ./cache
    rows = _train_rows(out)
    assert rows[-1][1] < rows[0][1]
    ck = training.load_checkpoint(out)
    assert any(k.startswith("adaptive.tail") for k in ck["model"])
    assert np.isfinite(json.loads((out / "summary.json").read_text())["test"]["ppl"])


# -- bad input: one sentence, exit 2, nothing written ----------------------------------------------
@pytest.fixture
def bad_files(english, tmp_path):
    good = make_zip(tmp_path / "enwik8.zip", {"enwik8": english[:4000]})
    raw = good.read_bytes()
    (tmp_path / "trunc.zip").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    # flip bytes inside the deflated member: a CRC / stream error when reading
    i = raw.index(b"enwik8") + 60
    (tmp_path / "crc.zip").write_bytes(raw[:i] + bytes(255 - b for b in raw[i:i + 40]) + raw[i + 40:])
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(english[:200])
    (tmp_path / "trunc.bz2").write_bytes(bz2.compress(english)[:500])
    (tmp_path / "other.zip").write_bytes(make_zip(tmp_path / "o.zip", {"readme.txt": "hi"}).read_bytes())
    return tmp_path


BAD = {
    "unknown pe": (["--pe", "xpos"], "invalid choice"),
    "unknown regime": (["--regime", "chaotic"], "invalid choice"),
    "unknown preset": (["--preset", "huge"], "invalid choice"),
    "heads do not divide": (["--d-model", "30", "--n-heads", "4"], "not divisible"),
    "zero seq": (["--seq-len", "0"], "at least 1"),
    "negative layers": (["--n-layers", "-2"], "at least 1"),
    "batch split": (["--batch-size", "3", "--grad-accum", "2"], "multiple"),
    "negative softplus": (["--lam", "-0.1", "--lam-mode", "softplus-diag"], "positive"),
    "nan lam": (["--lam", "nan"], "finite"),
    "bad cutoffs": (["--cutoffs", "5,x"], "comma-separated"),
    "unknown data": (["--data", "wikitext2"], "neither a known corpus"),
    "truncated zip": (["--data", "{d}/trunc.zip"], "corrupt or truncated"),
    "not a zip": (["--data", "{d}/junk.zip"], "corrupt or truncated"),
    "corrupt member": (["--data", "{d}/crc.zip"], "corrupt or truncated"),
    "unknown archive": (["--data", "{d}/other.zip"], "holds none of"),
    "empty corpus": (["--data", "{d}/empty.txt"], "is empty"),
    "too short": (["--data", "{d}/short.txt"], "too short"),
    "truncated bz2": (["--data", "{d}/trunc.bz2"], "corrupt or truncated"),
    "size mismatch": (["--data", "enwik8", "--cache-dir", "{d}/cache"], "not the published"),
    "resume missing": (["--resume", "{d}/nowhere"], "no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_exit_2(case, bad_files, capsys):
    argv, message = BAD[case]
    (bad_files / "cache").mkdir(exist_ok=True)
    (bad_files / "cache" / "enwik8.zip").write_bytes((bad_files / "enwik8.zip").read_bytes())
    out = bad_files / "out"
    argv = [a.format(d=bad_files) for a in argv] + ["--out", str(out), "--steps", "2", "--device", "cpu"]
    if "--data" not in argv:
        argv += ["--data", str(bad_files / "enwik8.zip")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()                                         # nothing half-written


def test_checksum_mismatch_and_offline_leave_nothing(bad_files, monkeypatch, capsys):
    cache = bad_files / "cache2"
    cache.mkdir()
    fake = (bad_files / "enwik8.zip").read_bytes()
    (cache / "enwik8.zip").write_bytes(fake)
    monkeypatch.setitem(text.SOURCES, "enwik8", dict(text.SOURCES["enwik8"], size=len(fake)))
    assert cli(["--data", "enwik8", "--cache-dir", cache, "--out", bad_files / "o1"]) == 2
    assert "sha256" in capsys.readouterr().err
    monkeypatch.setitem(text.SOURCES, "text8", dict(text.SOURCES["text8"], urls=["http://127.0.0.1:9/text8.zip"]))
    assert cli(["--data", "text8", "--cache-dir", cache, "--out", bad_files / "o2"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and str(cache / "text8.zip") in err
    assert sorted(os.listdir(cache)) == ["enwik8.zip"] and not (bad_files / "o1").exists()


def test_a_text8_zip_of_the_right_size_but_other_bytes_is_refused(bad_files, monkeypatch, capsys):
    # text8 is checked by digest, not only by size: a same-size substitute is not read
    cache = bad_files / "cache3"
    cache.mkdir()
    fake = (bad_files / "enwik8.zip").read_bytes()
    (cache / "text8.zip").write_bytes(fake)
    monkeypatch.setitem(text.SOURCES, "text8", dict(text.SOURCES["text8"], size=len(fake)))
    assert cli(["--data", "text8", "--cache-dir", cache, "--out", bad_files / "o3", "--steps", 1, *TINY]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and err.count("\n") == 1 and not (bad_files / "o3").exists()


def test_resume_with_another_config_or_a_corrupt_checkpoint_is_refused(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["--data", text_file, "--out", run, "--steps", 2, *TINY]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert cli(["--data", text_file, "--resume", run, "--steps", 4, *TINY, "--pe", "sin"]) == 2
    assert "pe='rope' but this command asks for pe='sin'" in capsys.readouterr().err
    assert cli(["--data", text_file, "--out", run, "--steps", 4, *TINY]) == 2      # no silent overwrite
    assert "--resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # a flag that would change the optimisation of the run being continued is refused, not applied
    assert cli(["--data", text_file, "--resume", run, "--lr", 0.123, *TINY]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.123 differs from the" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # --resume A --out B: the run continues in A, so B would be ignored — said, not done silently
    assert cli(["--data", text_file, "--resume", run, "--out", tmp_path / "elsewhere", "--steps", 4, *TINY]) == 2
    err = capsys.readouterr().err
    assert "would be ignored" in err and err.count("\n") == 1 and not (tmp_path / "elsewhere").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (run / "ckpt.pt").write_bytes(before["ckpt.pt"][:1000])
    assert cli(["--data", text_file, "--resume", run, "--steps", 4, *TINY]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_a_second_run_on_a_folder_in_use_is_refused_and_writes_nothing(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    held = training.FolderLock(run, ".run.lock", "another training run")   # a live run holds it
    for argv in (["--out", run], ["--resume", run]):
        assert cli(["--data", text_file, *argv, "--steps", 2, *TINY]) == 2
        assert "is in use by another training run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".run.lock"]
    held.release()
    assert cli(["--data", text_file, "--out", run, "--steps", 2, *TINY]) == 0   # free again


def test_script_exit_code_and_message_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "train_lm.py"), "--pe", "xpos"], env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "invalid choice" in p.stderr
    assert "--lam-mode" in train_lm.build_parser().format_help()
    # the benchmark moved to analysis/bench_lm.py: --bench is refused by argparse, and --help says where
    p = subprocess.run([sys.executable, str(ROOT / "train_lm.py"), "--bench"], env=ENV, capture_output=True, text=True)
    assert p.returncode == 2 and "error:" in p.stderr and "--bench" in p.stderr and "Traceback" not in p.stderr
    assert "python -m analysis.bench_lm" in train_lm.build_parser().format_help()


@pytest.mark.parametrize("flag,value,fragment", [
    ("--weight-decay", "nan", "--weight-decay must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--clip", "nan", "--clip must be a finite number"),
    ("--seed", "-1", "--seed must be 0 or more"),
])
def test_non_finite_and_negative_flags_are_refused_up_front(flag, value, fragment, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["--data", text_file, "--out", out, "--steps", 2, *TINY, flag, value]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()                                         # nothing written


def test_a_binary_file_as_a_corpus_gets_a_warning(tmp_path, capsys):
    from_text = "Plain prose, with accents: café, naïve — and a dash.\n".encode() * 200
    assert text.binary_warning(from_text, "prose.txt") == ""
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    msg = text.binary_warning(blob, "blob.bin")
    assert msg.startswith("warning: blob.bin does not look like text") and "training on its bytes anyway" in msg
    p = tmp_path / "blob.bin"
    p.write_bytes(blob)
    text.load_corpus(str(p), tmp_path / "cache")
    assert capsys.readouterr().err.startswith("warning: ")


def test_an_absurd_size_is_refused_with_the_memory_it_would_need(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["--data", text_file, "--out", out, "--steps", 2, *TINY, "--batch-size", 10 ** 10]) == 2
    err = capsys.readouterr().err
    assert "needs at least" in err and "GiB but cpu has" in err and err.count("\n") == 1
    assert not out.exists()
    # the bound is from below: the tiny configuration is far inside it
    assert train_lm.memory_lower_bound({"n_layers": 1, "d_model": 16, "seq_len": 16, "n_heads": 2}, 4) < 2 ** 20


# the layer-probe tests' model: 2 blocks of width 8, 2 heads, 12 tokens
PROBE_CFG = dict(vocab_size=256, d_model=8, n_layers=2, n_heads=2, seq_len=12, pe="learned", lam=0.0,
                 lam_mode="identity", regime="free", mlp_ratio=2.0, dropout=0.0, cutoffs="")


@pytest.mark.parametrize("c,fate", [(3.0, "converges"), (-0.5, "grows")])
def test_the_layer_probe_on_layers_whose_field_is_known_in_closed_form(c, fate):
    # W = 0 (Q = 0: uniform causal attention) and the value map V O = −c I: every token obeys
    # ẋᵢ = −c · mean_{j ≤ i} xⱼ, so token 1 decays like e^{−ct} and the others follow (c = 3:
    # converges; c = −0.5: grows like e^{t/2}). The mean mode's spectrum is −c: Re λ > 0 for no
    # direction at c = 3, yet |1 + λ| = 2 > 1 for all of them (the unit Euler step is unstable)
    torch.manual_seed(0)
    model = train_lm.build_lm(PROBE_CFG)
    with torch.no_grad():
        for blk in model.blocks:
            w = torch.zeros(24, 8)
            w[16:] = -c * torch.eye(8)                                  # [Q | K | V]ᵀ, V = −c I
            blk.attn.qkv.weight.copy_(w)
            blk.attn.proj.weight.copy_(torch.eye(8))                  # O = I
    rows = training.layer_fields(model, torch.randint(0, 256, (3, 12)), t_end=20.0)
    for r in rows:
        assert r["abscissa_V"] == pytest.approx(-c)
        assert math.isnan(r["rho_A"])                                 # W = 0 gives A = 0: no ratio to read
        assert r["n_re_pos"] == (0 if c > 0 else 8)
        assert r["n_euler_unstable"] == 8                             # |1 − 3| = 2 and 1 + 0.5 > 1
        assert r["fates"][fate] == 3
        # uniform causal attention: query i (1-based) spreads over i keys, entropy log i
        assert r["attention_entropy"] == pytest.approx(float(torch.log(torch.arange(1, 13, dtype=torch.float64)).mean()), abs=1e-12)
        assert 0 < r["effective_rank"] <= 8 and r["rope_in_field"] is False
    if c < 0:
        assert rows[0]["growth"] > 1e3                                # e^{t/2} at t = 20: ~2e4 for token 1


def test_the_layer_probe_drops_rope_from_the_field_only_where_asked():
    """drop_rope leaves the weights and the inputs X⁰ alone: on a RoPE model whose queries are 0
    (uniform attention, so the rotation changes nothing) both probes agree; on a model without
    RoPE it is refused in one sentence."""
    cfg = dict(PROBE_CFG, pe="rope")
    torch.manual_seed(0)
    model = train_lm.build_lm(cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:8].zero_()                           # Q = 0
    idx = torch.randint(0, 256, (2, 12))
    kept, dropped = (training.layer_fields(model, idx, t_end=5.0, drop_rope=d) for d in (False, True))
    for a, b in zip(kept, dropped):
        assert a["rope_in_field"] and not b["rope_in_field"]
        assert a["fates"] == b["fates"] and a["growth"] == pytest.approx(b["growth"], rel=1e-10)
        assert a["attention_entropy"] == pytest.approx(b["attention_entropy"], abs=1e-12)
    with pytest.raises(ValueError, match="RoPE"):
        training.layer_fields(train_lm.build_lm(dict(cfg, pe="learned")), idx, drop_rope=True)


def test_layers_at_eval_records_the_layer_regime_at_every_periodic_evaluation(text_file, tmp_path):
    """--layers-at-eval: when training leaves the regime, seen at each periodic evaluation (split
    "layers" in metrics.csv), and the same numbers as the layer probe at that step."""
    out = tmp_path / "run"
    assert cli(["--data", text_file, "--out", out, "--steps", 4, "--eval-every", 2, "--layers-at-eval",
                "--regime", "convergent", "--symmetric-A", *TINY]) == 0
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["split"] == "layers"]
    assert {int(r["step"]) for r in rows} == {2}                   # periodic only: the end is in summary.json
    got = {r["metric"]: float(r["value"]) for r in rows}
    assert set(got) == {"max_abscissa_V", "n_re_pos", "n_euler_unstable", "mean_rho_A", "fields_growing",
                        "fields_converging"}
    assert got["max_abscissa_V"] < 0 and got["n_re_pos"] == 0 and got["mean_rho_A"] < 1e-5   # ND, symmetric A
