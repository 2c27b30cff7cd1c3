"""train_lm.py --sample RUN and --eval-only RUN on tiny trained runs (a byte-level one with a tied
output, a word-level WikiText one with an adaptive softmax): sampling is a deterministic function
of the seed, temperature 0 and top-k 1 are the argmax of the model's own forward pass, exactly
--tokens tokens come out, --eval-only gives back the numbers training wrote into summary.json, the
run folder is left byte for byte as it was, and every bad input is one sentence and exit code 2."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_lm
import training
from data import text

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--warmup", "0", "--eval-tokens", "64", "--probe-batch", "2", "--device", "cpu", "--log-every", "10"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SEQ = 16

WIKI_TRAIN = (" \n = Valkyria Chronicles = \n \n The game began development in 2010 . \n"
              " It is the third game in the series . The game is a <unk> game . \n") * 60
WIKI_VALID = " \n = Tower Building = \n The tower is a game . \n" * 6
WIKI_TEST = " \n The zebra began the series . \n" * 8


def cli(argv):
    """train_lm's command line, in-process: (exit code)."""
    return training.run_cli(train_lm.main, [str(a) for a in argv])


def snapshot(folder):
    """Every file of a run folder (hidden ones too: .run.lock), by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A byte-level model (tied output, RoPE) trained 30 steps on ~60 kB of English."""
    from pydoc_data.topics import topics
    d = tmp_path_factory.mktemp("byte")
    (d / "english.txt").write_bytes("\n\n".join(topics[k] for k in sorted(topics))[:60000].encode())
    run = d / "run"
    assert cli(["--data", d / "english.txt", "--out", run, "--steps", 30, "--lr", 0.01,
                "--cache-dir", d / "cache", *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    """A word-level WikiText model (adaptive softmax, cutoffs 6,12; sinusoidal PE) on a small
    archive of the real format; its encoded ids and word list are cached in its --cache-dir."""
    d = tmp_path_factory.mktemp("word")
    path = d / "wikitext-103-v1.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in (("train", WIKI_TRAIN), ("valid", WIKI_VALID), ("test", WIKI_TEST)):
            z.writestr(f"wikitext-103/wiki.{name}.tokens", data)
    run = d / "run"
    assert cli(["--data", path, "--cutoffs", "6,12", "--pe", "sin", "--out", run, "--steps", 10,
                "--lr", 0.02, "--cache-dir", d / "cache", *TINY]) == 0
    return run


def rebuilt(run):
    """The run's model, rebuilt here from its checkpoint (not through train_lm's loader)."""
    state = training.load_checkpoint(run)
    model = train_lm.build_lm(state["config"])
    model.load_state_dict(state["model"])
    return model.eval(), state["config"]


def itos_of(run):
    cfg = training.load_checkpoint(run)["config"]
    if cfg["metric"] != "ppl":
        return None
    return text.load_corpus(cfg["data"], Path(json.loads((run / "args.json").read_text())["cache_dir"])).itos


@torch.no_grad()
def greedy_reference(model, ids, n):
    """Argmax decoding computed from the model's forward pass directly: on the growing sequence,
    cropped to its last seq_len tokens, take log p(v | window) of every position from the hidden
    states and the model's own output head (tied Eᵀ, or the adaptive softmax), check that they
    give forward()'s loss on the window's own next tokens, and append the argmax of the last one."""
    seq = list(ids)
    for _ in range(n):
        ctx = torch.tensor([seq[-SEQ:]])
        h = model.hidden(ctx)[0]                                           # (n, d)
        if model.adaptive is not None:
            logp = model.adaptive.log_prob(h)
        else:
            logp = F.log_softmax(h @ model.tok.weight.T, dim=-1)
        if ctx.shape[1] >= 2:                                              # forward() agrees
            loss = model(ctx[:, :-1], ctx[:, 1:]).item()
            mine = -logp[:-1].gather(1, ctx[0, 1:, None]).mean().item()
            assert loss == pytest.approx(mine, rel=1e-5, abs=1e-6)
        seq.append(int(logp[-1].argmax()))
    return seq[len(ids):]


def sample_out(capsys, run, *extra):
    capsys.readouterr()
    assert cli(["--sample", run, "--device", "cpu", *extra]) == 0
    return capsys.readouterr().out


# -- sampling ---------------------------------------------------------------------------------------
def test_sampling_is_a_function_of_the_seed(byte_run, capsys):
    args = ["--prompt", "The value of ", "--tokens", 40, "--temperature", 1.0, "--top-k", 0]
    rng = torch.get_rng_state()
    a = sample_out(capsys, byte_run, *args, "--seed", 1)
    assert a == sample_out(capsys, byte_run, *args, "--seed", 1)       # same seed, same text
    assert a != sample_out(capsys, byte_run, *args, "--seed", 2)       # another seed, another text
    assert a.startswith("The value of ")
    assert torch.equal(torch.get_rng_state(), rng)                     # the global RNG is not used
    # the function behind it: same seed, same ids; and a top-k of 5 only ever draws one of the 5 best
    model, _ = rebuilt(byte_run)
    ids = list(b"The value of ")
    one = train_lm.generate(model, ids, 30, temperature=1.0, top_k=0, seed=3)
    assert one == train_lm.generate(model, ids, 30, temperature=1.0, top_k=0, seed=3)
    assert one != train_lm.generate(model, ids, 30, temperature=1.0, top_k=0, seed=4)
    z = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {train_lm.pick_token(z, temperature=5.0, top_k=2, generator=g) for _ in range(200)} == {1, 3}
    # a tiny temperature is the argmax, without overflow
    assert train_lm.pick_token(z, temperature=1e-30, top_k=0, generator=g) == 1


@pytest.mark.parametrize("kind", ["byte", "word"])
def test_temperature_zero_and_top_k_one_are_the_argmax_of_the_forward_pass(kind, byte_run, word_run, capsys):
    run = byte_run if kind == "byte" else word_run
    prompt = "The value of" if kind == "byte" else "The game began"
    itos = itos_of(run)
    ids, unknown = train_lm.encode_prompt(prompt, itos)
    assert unknown == [] and len(ids) < SEQ
    model, _ = rebuilt(run)
    n = 24                                                  # prompt + 24 > seq_len: the window slides
    ref = greedy_reference(model, ids, n)
    assert train_lm.generate(model, ids, n, temperature=0.0) == ref
    for seed, temp in ((0, 1.0), (7, 2.5)):                 # top-k 1 keeps one token, whatever T
        assert train_lm.generate(model, ids, n, temperature=temp, top_k=1, seed=seed) == ref
    # the command line prints the prompt and that continuation
    greedy = sample_out(capsys, run, "--prompt", prompt, "--tokens", n, "--temperature", 0)
    assert greedy == train_lm.decode(ids + ref, itos) + "\n"
    assert sample_out(capsys, run, "--prompt", prompt, "--tokens", n, "--top-k", 1, "--seed", 9) == greedy


@pytest.mark.parametrize("kind", ["byte", "word"])
def test_exactly_the_requested_number_of_tokens(kind, byte_run, word_run, capsys):
    run = byte_run if kind == "byte" else word_run
    itos = itos_of(run)
    model, _ = rebuilt(run)
    ids, _ = train_lm.encode_prompt(None, itos)             # no --prompt: a line break / <eos>
    assert ids == ([10] if itos is None else [itos.index("<eos>")])
    for n in (1, 5, 3 * SEQ):
        new = train_lm.generate(model, ids, n, temperature=1.0, top_k=0, seed=n)
        assert len(new) == n and all(0 <= t < len(itos or range(256)) for t in new)
    out = sample_out(capsys, run, "--tokens", 3 * SEQ, "--seed", 5, "--temperature", 1.0, "--top-k", 0)
    assert out == train_lm.decode(ids + train_lm.generate(model, ids, 3 * SEQ, temperature=1.0, top_k=0,
                                                          seed=5), itos) + "\n"
    if itos is None:
        if "\ufffd" not in out:                         # valid UTF-8: the text is the bytes, 1 + 48
            assert len(out[:-1].encode()) == 1 + 3 * SEQ
    else:
        # words are joined by spaces, <eos> is a line break: 1 + 48 tokens in all
        assert len(out[:-1].split()) + out[:-1].count("\n") == 1 + 3 * SEQ
        # an unknown prompt word becomes <unk>, said on stderr, and sampling goes on
        capsys.readouterr()
        assert cli(["--sample", run, "--prompt", "The xylophone game", "--tokens", 3]) == 0
        captured = capsys.readouterr()
        assert "xylophone" in captured.err and "<unk>" in captured.err
        assert captured.out.startswith("The <unk> game")


# -- evaluation -------------------------------------------------------------------------------------
EVAL_LINE = re.compile(r"step (\d+): val (\w+) ([\d.]+)  test \w+ ([\d.]+)  "
                       r"\(nats per token: val ([\d.]+), test ([\d.]+);")


@pytest.mark.parametrize("kind", ["byte", "word"])
def test_eval_only_gives_back_the_final_numbers_of_training(kind, byte_run, word_run, capsys):
    run = byte_run if kind == "byte" else word_run
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert cli(["--eval-only", run, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    step, metric, val, test, val_loss, test_loss = EVAL_LINE.search(out).groups()
    assert int(step) == summary["step"] and metric == summary["metric"] == ("ppl" if kind == "word" else "bpb")
    for got, want in ((val, summary["val"][metric]), (test, summary["test"][metric]),
                      (val_loss, summary["val"]["loss"]), (test_loss, summary["test"]["loss"])):
        assert abs(float(got) - want) <= 1e-6, (got, want)
    # and the function behind it, to the last digits
    model, cfg = rebuilt(run)
    corpus = train_lm.run_corpus(cfg, Path(json.loads((run / "args.json").read_text())["cache_dir"]))
    ev = train_lm.evaluate_checkpoint(model, cfg, corpus, training.Runtime(device=torch.device("cpu")))
    for split in ("val", "test"):
        assert abs(ev[split]["loss"] - summary[split]["loss"]) <= 1e-6
        assert abs(ev[split][metric] - summary[split][metric]) <= 1e-6


def test_the_run_folder_is_left_byte_for_byte_as_it_was(byte_run, word_run, capsys):
    for run in (byte_run, word_run):
        before = snapshot(run)
        assert ".run.lock" in before and "ckpt.pt" in before
        assert cli(["--sample", run, "--tokens", 5]) == 0
        assert cli(["--sample", run / "ckpt.pt", "--tokens", 5, "--temperature", 0]) == 0   # RUN/ckpt.pt too
        assert cli(["--eval-only", run]) == 0
        assert snapshot(run) == before


# -- bad input: one sentence, exit 2 -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_runs(byte_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()                                              # a folder without ckpt.pt
    shutil.copytree(byte_run, d / "corrupt")
    raw = (d / "corrupt" / "ckpt.pt").read_bytes()
    (d / "corrupt" / "ckpt.pt").write_bytes(raw[: len(raw) // 3])      # truncated
    (d / "foreign").mkdir()                                            # a checkpoint of something else
    torch.save({"model": {}, "optimizer": {}, "step": 0, "rng": {}, "config": {"img_size": 32}},
               d / "foreign" / "ckpt.pt")
    return d


BAD = {
    "run missing": (["--sample", "{d}/nowhere"], "no run there"),
    "no ckpt.pt": (["--sample", "{d}/empty"], "no checkpoint at"),
    "corrupt checkpoint": (["--sample", "{d}/corrupt"], "corrupt or truncated"),
    "not an LM checkpoint": (["--sample", "{d}/foreign"], "not a train_lm.py checkpoint"),
    "eval: run missing": (["--eval-only", "{d}/nowhere"], "no run there"),
    "eval: no ckpt.pt": (["--eval-only", "{d}/empty"], "no checkpoint at"),
    "eval: corrupt checkpoint": (["--eval-only", "{d}/corrupt"], "corrupt or truncated"),
    "tokens 0": (["--sample", "{byte}", "--tokens", "0"], "--tokens must be between 1 and"),
    "tokens absurd": (["--sample", "{byte}", "--tokens", "1000000000"], "--tokens must be between 1 and"),
    "tokens not a number": (["--sample", "{byte}", "--tokens", "ten"], "invalid int value"),
    "temperature negative": (["--sample", "{byte}", "--temperature", "-0.5"], "--temperature must be a finite"),
    "temperature nan": (["--sample", "{byte}", "--temperature", "nan"], "--temperature must be a finite"),
    "temperature inf": (["--sample", "{byte}", "--temperature", "inf"], "--temperature must be a finite"),
    "top-k negative": (["--sample", "{byte}", "--top-k", "-1"], "--top-k must be 0"),
    "seed negative": (["--sample", "{byte}", "--seed", "-3"], "--seed must be 0 or more"),
    "byte prompt empty": (["--sample", "{byte}", "--prompt", ""], "--prompt is empty"),
    "word prompt empty": (["--sample", "{word}", "--prompt", ""], "holds no word of the model's"),
    "word prompt unknown": (["--sample", "{word}", "--prompt", "xylophone qwzx"], "holds no word of the model's"),
    "sample with a model flag": (["--sample", "{byte}", "--d-model", "32"], "--d-model is a training flag"),
    "sample with --steps": (["--sample", "{byte}", "--steps", "5"], "--steps is a training flag"),
    "sample with --data": (["--sample", "{byte}", "--data", "pydocs"], "--data is a training flag"),
    "sample with --resume": (["--sample", "{byte}", "--resume", "{byte}"], "--resume is a training flag"),
    "sample with --out": (["--sample", "{byte}", "--out", "{d}/new"], "--out is a training flag"),
    "sample and eval-only": (["--sample", "{byte}", "--eval-only", "{byte}"], "two different commands"),
    "eval-only with --prompt": (["--eval-only", "{byte}", "--prompt", "x"], "--prompt only applies to --sample"),
    "eval-only with --seed": (["--eval-only", "{byte}", "--seed", "1"], "--seed only applies to --sample"),
    "training with --temperature": (["--data", "pydocs", "--out", "{d}/new", "--temperature", "0.5"],
                                    "--temperature only applies to --sample RUN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_exit_2(case, bad_runs, byte_run, word_run, capsys):
    argv, message = BAD[case]
    argv = [a.format(d=bad_runs, byte=byte_run, word=word_run) for a in argv]
    before = snapshot(byte_run), snapshot(word_run)
    capsys.readouterr()
    assert cli(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    assert not (bad_runs / "new").exists()
    assert (snapshot(byte_run), snapshot(word_run)) == before


def test_the_script_itself_exits_2_without_a_traceback(bad_runs):
    p = subprocess.run([sys.executable, str(ROOT / "train_lm.py"), "--sample", str(bad_runs / "corrupt"),
                        "--device", "cpu"], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "corrupt or truncated" in p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_a_word_level_run_samples_from_its_checkpoint_alone(word_run, monkeypatch, capsys):
    """The words are stored in the checkpoint: with the corpus made unreachable, --sample still
    works, and gives what it gives with the corpus."""
    ck = training.load_checkpoint(word_run)
    assert ck["extra"]["itos"] == itos_of(word_run) and len(ck["extra"]["itos"]) == ck["config"]["vocab_size"]
    before = sample_out(capsys, word_run, "--tokens", 8, "--seed", 3)

    def unreachable(*a, **k):
        raise AssertionError("--sample read the corpus although the checkpoint holds the words")
    monkeypatch.setattr(train_lm, "run_corpus", unreachable)
    assert sample_out(capsys, word_run, "--tokens", 8, "--seed", 3) == before
