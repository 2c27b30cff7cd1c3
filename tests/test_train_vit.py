"""train_vit.py: every PE × λ mode × regime learns; 2-D RoPE is relative in both axes and keeps
norms; without a PE the model is permutation-equivariant on patches (and the embedded task is
then at chance by construction); the optimiser decays exactly the weight matrices; --data cifar10
is fetched and checked; resume equals an uninterrupted run; every bad input is one sentence,
exit 2, nothing written.  (The data pipeline's tests are in test_data_images.py, the benchmark's
in test_bench_vit.py, the PE comparison's in test_compare_vit.py.)"""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ode_attention
import rope
import train_vit
import training
from data import images
from test_data_images import cifar_archive, image_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--mlp-ratio", "2", "--batch-size", "8",
        "--warmup", "0", "--eval-images", "64", "--probe-batch", "2", "--device", "cpu", "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli(argv):
    """train_vit's command line, in-process: (exit code)."""
    return training.run_cli(train_vit.main, [str(a) for a in argv])


def tiny_cfg(**over):
    cfg = dict(image_size=32, patch_size=8, n_classes=4, d_model=16, n_layers=1, n_heads=2, mlp_ratio=2.0,
               pe="learned", pool="cls", lam=0.0, lam_mode="identity", regime="free", dropout=0.0,
               drop_path=0.0, rope_base=100.0, lr=1e-2, beta2=0.99, weight_decay=0.0)
    return cfg | over


def sharpen(model, factor=30.0):
    """Scale the query/key/value maps: at init (std 0.02) the logits are ≈ 0 and attention is nearly
    uniform, which would hide any effect of position."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(factor)
    return model


def permute_patches(img, perm, p):
    """Move patch perm[k] of a (B, 3, H, W) image to place k (row-major patches)."""
    B, C, H, W = img.shape
    g = W // p
    tiles = img.reshape(B, C, H // p, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p, p)[:, perm]
    return tiles.reshape(B, H // p, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


# -- the model -----------------------------------------------------------------
LAMS = {"off": (0.0, "identity", "free"), "identity": (-0.1, "identity", "free"),
        "softplus-diag": (0.05, "softplus-diag", "free"), "divergent": (0.0, "identity", "divergent"),
        "convergent": (0.0, "identity", "convergent")}


@pytest.mark.parametrize("pe", train_vit.PES)
@pytest.mark.parametrize("variant", list(LAMS))
def test_a_few_steps_reduce_the_loss(pe, variant):
    torch.manual_seed(0)
    lam, mode, regime = LAMS[variant]
    cfg = tiny_cfg(pe=pe, lam=lam, lam_mode=mode, regime=regime, pool="mean" if pe == "sin2d" else "cls")
    model = train_vit.build_vit(cfg)
    opt = train_vit.make_optimizer(model, cfg, torch.device("cpu"))
    x, y = images.make_shapes(32, seed=1)
    x = images.normalise(torch.from_numpy(x), images.SHAPES_NORM)
    t = images.soft_targets(torch.from_numpy(y), 4, 0.0)
    losses = []
    for _ in range(25):
        loss = train_vit.soft_cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses[-1]) and losses[-1] < losses[0] - 0.3, losses[::6]


def test_without_a_pe_the_model_is_permutation_equivariant_on_patches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    perm = torch.randperm(16)
    xp = permute_patches(x, perm, 8)
    assert torch.equal(train_vit.patchify(xp, 8), train_vit.patchify(x, 8)[:, perm])
    for pool in ("cls", "mean"):
        model = sharpen(train_vit.build_vit(tiny_cfg(pe="none", pool=pool, n_layers=2, lam=-0.1)).double().eval())
        h, hp = model.hidden(x), model.hidden(xp)
        n0 = 1 if pool == "cls" else 0
        # patch outputs are permuted like the patches; the class token's output does not move
        torch.testing.assert_close(hp[:, n0:], h[:, n0:][:, perm], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(xp), model(x), rtol=1e-12, atol=1e-12)
    for pe in ("learned", "sin2d", "rope-axial", "rope-mixed"):          # every PE breaks it
        model = sharpen(train_vit.build_vit(tiny_cfg(pe=pe)).double().eval())
        assert (model(xp) - model(x)).abs().max() > 1e-3, pe


def test_2d_rope_is_relative_in_both_axes_and_keeps_norms():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)           # 3 tokens, d_h = 16
    mixed = rope.RoPEMixed(16, 1, generator=g).double()

    def rotate(kind, x, pos):
        pos = torch.tensor(pos, dtype=torch.float64)
        if kind == "axial":
            return rope.apply_rope_2d(x, pos, base=100.0)
        return mixed(x[None], pos)[0]

    for kind in ("axial", "mixed"):
        tol = 1e-12 if kind == "axial" else 1e-5         # RoPEMixed computes its angles in float32
        pos = [[0, 0], [2, 5], [7, 1]]
        qr, kr = rotate(kind, q, pos), rotate(kind, k, pos)
        torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1), rtol=tol, atol=0)     # ‖xR‖ = ‖x‖
        logits = qr @ kr.T
        for shift in ([3, 0], [0, -4], [5, 11]):                       # translate the whole grid
            moved = [[r + shift[0], c + shift[1]] for r, c in pos]
            torch.testing.assert_close(rotate(kind, q, moved) @ rotate(kind, k, moved).T, logits,
                                       rtol=tol, atol=tol)
        # ... and the logit does depend on the row offset and on the column offset
        q0, k0 = q[:1], k[:1]
        base = (rotate(kind, q0, [[0, 0]]) @ rotate(kind, k0, [[0, 0]]).T).item()
        for other in ([1, 0], [0, 1]):
            assert abs((rotate(kind, q0, [[0, 0]]) @ rotate(kind, k0, [other]).T).item() - base) > 1e-3


@pytest.mark.parametrize("pe", ["rope-axial", "rope-mixed"])
def test_a_rope_vit_only_sees_relative_positions(pe):
    torch.manual_seed(0)
    # mean pooling: no class token, which, unrotated, would sit at the origin (0, 0)
    model = sharpen(train_vit.build_vit(tiny_cfg(pe=pe, pool="mean", n_layers=2, lam=0.05,
                                                 lam_mode="softplus-diag")).double().eval())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = model(x)
    model.positions = model.positions + torch.tensor([3, -7])          # the same grid, moved
    tol = 1e-10 if pe == "rope-axial" else 1e-5                        # RoPEMixed: float32 angles
    torch.testing.assert_close(model(x), before, rtol=tol, atol=tol)
    model.positions = model.positions.flip(0)                          # patches at other places
    assert (model(x) - before).abs().max() > 1e-4



def test_weight_decay_is_on_the_weight_matrices_only():
    """AdamW decays every ≥ 2-D weight (patch embedding, attention, MLP, head) and nothing else: not
    the class token, the learned positions, RoPE-Mixed's frequencies, λ or θ (nor norms, biases)."""
    special = ("cls", "pos.weight", "freqs", "lam", "lam_phi", "theta")
    for pe, lam, mode, regime in (("learned", 0.05, "softplus-diag", "free"), ("rope-mixed", -0.1, "identity", "convergent"),
                                  ("sin2d", 0.0, "identity", "intermediate"), ("none", 0.0, "identity", "divergent")):
        model = train_vit.build_vit(tiny_cfg(pe=pe, lam=lam, lam_mode=mode, regime=regime, n_layers=2))
        opt = train_vit.make_optimizer(model, tiny_cfg(weight_decay=0.05), torch.device("cpu"))
        names = {id(p): n for n, p in model.named_parameters()}
        decayed, kept = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
        assert decayed == [n for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith(special)]
        assert kept == [n for n in names.values() if n not in decayed]


# -- the command line: outputs, resume ---------------------------------------------------------------
class _StopAfter(training.GracefulExit):
    """A SIGTERM that arrives during step 3, deterministically."""
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    @property
    def requested(self):
        self.calls += 1
        if self.calls == 3:
            self.signum = signal.SIGTERM
        return self.signum is not None


def _rows(run, split="train", metric="loss"):
    return [(r["step"], r["value"]) for r in training.RunDir(run).read() if r["split"] == split and r["metric"] == metric]


def test_resume_equals_an_uninterrupted_run_and_every_output_is_written(tmp_path, monkeypatch):
    # dropout, drop-path, crops, flips, mixup, cutmix and smoothing: every RNG of the loop in play
    common = [*TINY, "--steps", 7, "--eval-every", 3, "--dropout", 0.1, "--drop-path", 0.2, "--n-layers", 2,
              "--crop-min-scale", 0.5, "--hflip", 0.5, "--mixup", 0.8, "--cutmix", 1.0, "--label-smoothing", 0.1,
              "--lam", 0.05, "--lam-mode", "softplus-diag", "--log-every", 2]   # the stop at 3 cuts a window
    full = tmp_path / "full"
    assert cli([*common, "--out", full]) == 0
    for name in ("config.json", "versions.json", "metrics.csv", "loss.png", "ckpt.pt", "probe.csv",
                 "probe.png", "regimes.csv", "summary.json"):
        assert (full / name).stat().st_size > 0, name
    run = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(training, "GracefulExit", _StopAfter)
        assert cli([*common, "--out", run]) == 128 + signal.SIGTERM
    assert training.load_checkpoint(run)["step"] == 3 and not (run / "summary.json").exists()
    assert cli(["--resume", run]) == 0                    # the flags come from the run's config.json
    assert _rows(run) == _rows(full) and [s for s, _ in _rows(full)] == [2, 4, 6, 7]   # bit for bit
    assert _rows(run, "val", "top1") == _rows(full, "val", "top1") and [s for s, _ in _rows(full, "val", "top1")] == [3, 6, 7]
    summary = json.loads((full / "summary.json").read_text())
    assert json.loads((run / "summary.json").read_text())["val"] == summary["val"]
    assert len(summary["lam"]) == 2 and len(summary["lam"][0]) == 2     # λ per layer, per head (× d_h)
    # the per-layer record: init (written before the cut, kept through the resume), end, end without RoPE
    resumed = json.loads((run / "summary.json").read_text())["layers"]
    assert resumed["init"] == summary["layers"]["init"] and resumed["end"] == summary["layers"]["end"]
    assert [len(summary["layers"][k]) for k in ("init", "end", "end_no_rope")] == [2, 2, 2]
    assert summary["layers"]["end"][0]["rope_in_field"] and not summary["layers"]["end_no_rope"][0]["rope_in_field"]
    assert sum(summary["layers"]["end"][1]["fates"].values()) == 8          # one fate per probe image
    # the probe: layers 0..L for both modes; the regime report: one row per layer
    rows = list(csv.DictReader(open(full / "probe.csv")))
    assert {(r["mode"], int(r["layer"])) for r in rows} == {(m, l) for m in ("full", "attention-only") for l in range(3)}
    report = list(csv.DictReader(open(full / "regimes.csv")))
    assert [r["layer"] for r in report] == ["0", "1"] and report[0]["regime"] in ("convergent", "divergent", "intermediate")
    assert sum(map(int, report[0]["inertia_W_sym"].split("/"))) == 16
    # the checkpoint's config rebuilds the model, and one block alone (what regimes.py needs)
    state = training.load_checkpoint(full)
    cfg = state["config"]
    model = train_vit.build_vit(cfg)
    model.load_state_dict(state["model"])
    block = ode_attention.Block(cfg["d_model"], cfg["n_heads"], mlp_ratio=cfg["mlp_ratio"], causal=cfg["causal"],
                                pe=cfg["attn_pe"], lam=cfg["lam"], lam_mode=cfg["lam_mode"], regime=cfg["regime"],
                                bias=cfg["qkv_bias"], rope_base=cfg["rope_base"])
    block.load_state_dict({k[len("blocks.1."):]: v for k, v in state["model"].items() if k.startswith("blocks.1.")})


def test_torchrun_two_processes_match_one(tmp_path):
    data = cifar_archive(tmp_path / "c.tar.gz")                     # small: 30 + 6 images
    common = [*TINY, "--data", data, "--patch-size", 8, "--steps", 3, "--eval-every", 0,
              "--crop-min-scale", 0.5, "--hflip", 0.5, "--label-smoothing", 0.1]
    assert cli([*common, "--out", tmp_path / "one"]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train_vit.py"), *map(str, common), "--out", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    # each process evaluates half of the validation images; the counts are summed
    assert _rows(tmp_path / "one", "val", "top1") == _rows(tmp_path / "two", "val", "top1")
    sa, sb = training.load_checkpoint(tmp_path / "one")["model"], training.load_checkpoint(tmp_path / "two")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)



def test_cifar10_is_fetched_into_the_cache_and_checked(tmp_path, monkeypatch, capsys):
    path = cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    # --data cifar10: fetched into the cache (here: already there) and checked against its md5
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(path.read_bytes())
    assert cli(["--data", "cifar10", "--cache-dir", cache, "--out", tmp_path / "o", *TINY]) == 2
    assert "md5" in capsys.readouterr().err                              # not the published file
    monkeypatch.setitem(images.CIFAR10, "md5", hashlib.md5(path.read_bytes()).hexdigest())
    out = tmp_path / "run"
    assert cli(["--data", "cifar10", "--cache-dir", cache, "--out", out, "--steps", 2, "--patch-size", 8,
                "--hflip", 0.5, "--crop-min-scale", 0.5, *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["classes"][0] == "airplane"


# -- bad input: one sentence, exit 2, nothing written ----------------------------------------------
BAD = {
    "unknown pe": (["--pe", "rope"], "invalid choice"),
    "unknown pool": (["--pool", "max"], "invalid choice"),
    "patch does not divide": (["--patch-size", "5"], "not a multiple"),
    "heads do not divide": (["--d-model", "30", "--n-heads", "4"], "not divisible"),
    "axial head width": (["--d-model", "12", "--n-heads", "2", "--pe", "rope-axial"], "divisible by 4"),
    "negative softplus": (["--lam", "-0.1", "--lam-mode", "softplus-diag"], "positive"),
    "imagenet preset without data": (["--preset", "deit-tiny"], "pass --data"),
    "batch split": (["--batch-size", "3", "--grad-accum", "2"], "multiple"),
    "bad smoothing": (["--label-smoothing", "1.5"], "label-smoothing"),
    "unknown data": (["--data", "imagenet21k"], "neither a known dataset"),
    "not an archive": (["--data", "{d}/notes.txt"], "not a CIFAR-10"),
    "truncated archive": (["--data", "{d}/cut.tar.gz"], "corrupt or truncated"),
    "empty class": (["--data", "{d}/empty"], "holds no images"),
    "no val": (["--data", "{d}/noval"], "val is missing"),
    "resume missing": (["--resume", "{d}/nowhere"], "no checkpoint"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("hello")
    raw = cifar_archive(d / "good.tar.gz").read_bytes()
    (d / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
    (d / "empty" / "train" / "cat").mkdir(parents=True)
    (d / "empty" / "val" / "cat").mkdir(parents=True)
    (d / "noval" / "train" / "cat").mkdir(parents=True)
    (d / "noval" / "train" / "cat" / "x.png").write_bytes(image_bytes((1, 2, 3), fmt="PNG"))
    return d


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_exit_2(case, bad_files, tmp_path, capsys):
    argv, message = BAD[case]
    out = tmp_path / "out"
    argv = [a.format(d=bad_files) for a in argv] + ["--out", str(out), "--steps", "2", "--device", "cpu"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()                                         # nothing half-written


def test_script_exit_code_and_message_without_traceback():
    p = subprocess.run([sys.executable, str(ROOT / "train_vit.py"), "--pe", "rope"], env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "invalid choice" in p.stderr
    assert "--lam-mode" in train_vit.build_parser().format_help()


@pytest.mark.parametrize("flag,value", [("--weight-decay", "nan"), ("--lr", "inf"), ("--clip", "nan"),
                                        ("--rope-base", "inf")])
def test_non_finite_flags_are_refused_up_front(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["--out", out, "--steps", 2, *TINY, flag, value]) == 2
    assert f"{flag} must be a finite number" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("pe", ["rope-axial", "rope-mixed"])
def test_layer_fields_rotate_by_the_patch_positions_and_drop_rope_is_the_unrotated_model(pe):
    # a 2-D RoPE ViT's own fields need its patch positions; with RoPE dropped the record must be that of
    # the same weights in a ViT without any PE (an independent build), and differ from the kept one
    torch.manual_seed(0)
    kw = dict(image_size=16, patch_size=4, n_classes=3, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0)
    model = train_vit.ViT(pe=pe, **kw)
    with torch.no_grad():                                            # logits of order 1, not ~0 as at init
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(40.0)
    plain = train_vit.ViT(pe="none", **kw)
    plain.load_state_dict(model.state_dict(), strict=False)          # RoPE-Mixed's frequencies have no home there
    x = torch.randn(3, 3, 16, 16)
    kept, dropped = (training.layer_fields(model, x, t_end=5.0, drop_rope=d) for d in (False, True))
    ref = training.layer_fields(plain, x, t_end=5.0)
    for a, b in zip(dropped, ref):
        assert a["attention_entropy"] == pytest.approx(b["attention_entropy"], rel=1e-12)
        assert a["growth"] == pytest.approx(b["growth"], rel=1e-10) and a["fates"] == b["fates"]
    assert all(r["rope_in_field"] for r in kept) and not any(r["rope_in_field"] for r in dropped)
    assert abs(kept[0]["attention_entropy"] - dropped[0]["attention_entropy"]) > 1e-6
    with pytest.raises(ValueError, match="RoPE"):
        training.layer_fields(plain, x, drop_rope=True)
