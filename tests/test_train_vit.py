"""train_vit.py: every PE × λ mode × regime learns; 2-D RoPE is relative in both axes and keeps
norms; without a PE the model is permutation-equivariant on patches (and the embedded task is
then at chance by construction); the transforms do what their formulas say; the folder and
CIFAR-10 loaders read small files of the real formats (a corrupt image is skipped and counted);
resume equals an uninterrupted run; every bad input is one sentence, exit 2, nothing written."""
import csv
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ode_attention  # noqa: E402
import rope  # noqa: E402
import train_vit  # noqa: E402
import training  # noqa: E402

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--mlp-ratio", "2", "--batch-size", "8",
        "--warmup", "0", "--eval-images", "64", "--probe-batch", "2", "--device", "cpu", "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
CPU = training.Runtime(device=torch.device("cpu"))


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


# -- the embedded task and the model -----------------------------------------------------------------
def test_shapes_labels_follow_the_arrangement_and_patch_contents_do_not():
    x, y = train_vit.make_shapes(400, seed=3)
    assert x.shape == (400, 3, 32, 32) and x.dtype == np.uint8 and set(np.unique(y)) == {0, 1, 2, 3}
    bright = x.max(1) >= 110                                       # sprite pixels (background ≤ 40)
    for i in range(40):
        cells = bright.reshape(400, 4, 8, 4, 8)[i].any((1, 3))      # (row, col) cells holding a sprite
        # A (filled 5×5 square) is the only sprite with 25 bright pixels in its cell
        counts = bright[i].reshape(4, 8, 4, 8).sum((1, 3))
        ra, ca = np.argwhere(counts == 25)[0]
        rb, cb = np.argwhere(counts == 9)[0]                        # B: the plus sign, 9 pixels
        assert cells.sum() in (2, 3, 4) and ra != rb and ca != cb
        assert y[i] == 2 * (rb > ra) + (cb > ca)
    # the same multiset of cell contents for every label: sprite counts per image do not depend on it
    per_img = bright.sum((1, 2))
    means = [per_img[y == k].mean() for k in range(4)]
    assert max(means) - min(means) < 8


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
    x, y = train_vit.make_shapes(32, seed=1)
    x = train_vit.normalise(torch.from_numpy(x), train_vit.SHAPES_NORM)
    t = train_vit.soft_targets(torch.from_numpy(y), 4, 0.0)
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


# -- the transforms -------------------------------------------------------------------------------
def test_crops_flips_mixing_and_smoothing_follow_their_formulas():
    rng = np.random.default_rng(0)
    boxes, flips = train_vit.sample_crops(rng, 2000, 48, 64, 0.25, 0.5)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    frac = h * w / (48 * 64)
    assert frac.min() > 0.22 and frac.max() <= 1.0 and 0.45 < flips.mean() < 0.55
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    # the affine resampler: a box at scale 1 is the slice itself, a flip is torch.flip
    x = torch.rand(3, 3, 16, 16)
    box = np.array([[4, 2, 8, 8], [0, 8, 8, 8], [8, 0, 8, 8]])
    out = train_vit.crop_resize_tensor(x, box, np.array([False, True, False]), 8)
    torch.testing.assert_close(out[0], x[0, :, 4:12, 2:10])
    torch.testing.assert_close(out[1], x[1, :, 0:8, 8:16].flip(-1))
    torch.testing.assert_close(out[2], x[2, :, 8:16, 0:8])
    # a whole-image box resized to half size is the 2×2 average (bilinear at the right centres)
    half = train_vit.crop_resize_tensor(x, np.tile([0, 0, 16, 16], (3, 1)), np.zeros(3, bool), 8)
    torch.testing.assert_close(half, F.avg_pool2d(x, 2))
    # label smoothing, mixup, cutmix
    y = torch.tensor([0, 1, 2, 3])
    t = train_vit.soft_targets(y, 4, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(4)) and t[0, 0] == pytest.approx(0.9 + 0.025)
    imgs = torch.arange(4.0)[:, None, None, None].expand(4, 3, 10, 10).contiguous()
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0)):
        xm, tm = train_vit.mix_batch(imgs, t, np.random.default_rng(5), mixup, cutmix)
        # image 0's pixels are a λ-mix of images 0 and 3; its target mixes the same way
        share_of_3 = (xm[0] / 3.0).mean().item()
        torch.testing.assert_close(tm[0], (1 - share_of_3) * t[0] + share_of_3 * t[3])
        assert torch.allclose(tm.sum(1), torch.ones(4))
        if cutmix:                                                   # pixels are copied, not blended
            assert set(xm[0].unique().tolist()) <= {0.0, 3.0}


# -- loaders on small files of the real formats ---------------------------------------------------------
def _jpeg_bytes(rgb, size=(40, 30), fmt="JPEG", mode="RGB"):
    from PIL import Image
    arr = np.clip(np.array(rgb)[None, None] + np.random.default_rng(0).integers(-20, 20, (size[1], size[0], 3)),
                  0, 255).astype(np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/{red,blue}: JPEGs, a grey PNG, an RGBA PNG, a corrupt .JPEG and a truncated JPEG."""
    root = tmp_path_factory.mktemp("imagenet")
    colours = {"blue": (30, 40, 220), "red": (220, 30, 40)}
    for split, n in (("train", 3), ("val", 2)):
        for c, rgb in colours.items():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{c}_{i}.JPEG").write_bytes(_jpeg_bytes(rgb, size=(40 + 8 * i, 30)))
    (root / "train" / "red" / "grey.png").write_bytes(_jpeg_bytes((200, 200, 200), fmt="PNG", mode="L"))
    (root / "train" / "blue" / "alpha.png").write_bytes(_jpeg_bytes((30, 40, 220), fmt="PNG", mode="RGBA"))
    (root / "train" / "blue" / "broken.JPEG").write_bytes(b"this is not a JPEG at all")
    (root / "train" / "red" / "cut.JPEG").write_bytes(_jpeg_bytes((220, 30, 40))[:300])
    (root / "train" / "red" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def test_folder_loader_reads_real_files_and_skips_corrupt_ones(image_folder):
    data = train_vit.load_data(str(image_folder), Path("unused"))
    assert data.classes == ["blue", "red"] and data.n_train == 10 and data.n_val == 4
    cfg = dict(tiny_cfg(), batch_size=10, grad_accum=1, steps=3, seed=0, label_smoothing=0.0, mixup=0.0,
               cutmix=0.0, crop_min_scale=0.3, hflip=0.5, image_size=16)
    seen = []
    for workers in (0, 2):
        batches = train_vit.Batches(data, cfg, CPU, 10, workers=workers)
        steps = [batches(s, 0) for s in range(3)]
        seen.append(steps)
        assert len(batches.unreadable) == 2 and {Path(p).name for p in batches.unreadable} == {"broken.JPEG", "cut.JPEG"}
    for (x0, t0), (x1, t1) in zip(*seen):                       # workers do not change the batches
        assert torch.equal(x0, x1) and torch.equal(t0, t1)
    for x, t in seen[0]:
        assert x.shape == (10, 3, 16, 16)
        rgb = x.mean((2, 3)) * torch.tensor(train_vit.IMAGENET_NORM[1]) + torch.tensor(train_vit.IMAGENET_NORM[0])
        label = t.argmax(1)
        colourful = (rgb[:, 0] - rgb[:, 2]).abs() > 0.3              # not the grey PNG
        assert ((rgb[:, 2] > rgb[:, 0]) == (label == 0))[colourful].all()   # blue ⇔ class 0
    # a loader restarted at step 2 (resume) gives step 2's batch
    again = train_vit.Batches(data, cfg, CPU, 10, workers=0)(2, 0)
    assert torch.equal(again[0], seen[0][2][0])
    # evaluation: the centre crops of all four validation images
    model = train_vit.build_vit(dict(cfg, n_classes=2, patch_size=8)).eval()
    with torch.no_grad():
        ev = train_vit.evaluate(model, data, dict(cfg, n_classes=2), CPU, batch=3)
    assert set(ev) == {"loss", "top1"} and ev["top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)


def test_folder_errors_are_clear(image_folder, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train/ is missing|train is missing"):
        train_vit.load_data(str(tmp_path), Path("unused"))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.txt").write_text("x")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folder .*cat holds no images"):
        train_vit.load_data(str(tmp_path), Path("unused"))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ValueError, match="needs Pillow"):
        train_vit.load_data(str(image_folder), Path("unused"))


def _cifar_archive(path, n_per_batch=6, bad_member=None):
    """The real layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, each a
    protocol-2 pickle of a dict with 'data' (N, 3072) uint8 and 'labels'."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            raw = pickle.dumps(obj, protocol=2) if not isinstance(obj, bytes) else obj
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 255, 0, 128   # image 0: (255, 0, 128)
            data[0, 5] = 7                                                      # red plane, row 0, column 5
            add(name, bad_member if bad_member and name == "test_batch" else
                {"batch_label": name, "labels": rng.integers(0, 10, n_per_batch).tolist(), "data": data})
        add("batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                             "horse", "ship", "truck"]})
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_loader_reads_the_real_format(tmp_path, monkeypatch, capsys):
    path = _cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    d = train_vit.load_data(str(path), tmp_path)
    assert d.train_x.shape == (30, 3, 32, 32) and d.val_x.shape == (6, 3, 32, 32) and d.classes[9] == "truck"
    assert tuple(d.train_x[0, :, 3, 3]) == (255, 0, 128) and d.train_x[0, 0, 0, 5] == 7
    # --data cifar10: fetched into the cache (here: already there) and checked against its md5
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(path.read_bytes())
    assert cli(["--data", "cifar10", "--cache-dir", cache, "--out", tmp_path / "o", *TINY]) == 2
    assert "md5" in capsys.readouterr().err                              # not the published file
    monkeypatch.setitem(train_vit.CIFAR10, "md5", hashlib.md5(path.read_bytes()).hexdigest())
    out = tmp_path / "run"
    assert cli(["--data", "cifar10", "--cache-dir", cache, "--out", out, "--steps", 2, "--patch-size", 8,
                "--hflip", 0.5, "--crop-min-scale", 0.5, *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["classes"][0] == "airplane"
    # a pickle that would run code is refused, not executed
    _cifar_archive(tmp_path / "evil.tar.gz", bad_member=pickle.dumps({"data": _Evil()}, protocol=2))
    with pytest.raises(ValueError, match="never does"):
        train_vit.load_data(str(tmp_path / "evil.tar.gz"), tmp_path)


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
              "--lam", 0.05, "--lam-mode", "softplus-diag"]
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
    assert cli([*common, "--resume", run]) == 0
    assert _rows(run) == _rows(full) and len(_rows(full)) == 7           # bit for bit, every step
    assert _rows(run, "val", "top1") == _rows(full, "val", "top1") and [s for s, _ in _rows(full, "val", "top1")] == [3, 6, 7]
    summary = json.loads((full / "summary.json").read_text())
    assert json.loads((run / "summary.json").read_text())["val"] == summary["val"]
    assert len(summary["lam"]) == 2 and len(summary["lam"][0]) == 2     # λ per layer, per head (× d_h)
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
    data = _cifar_archive(tmp_path / "c.tar.gz")                     # small: 30 + 6 images
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


def test_bench_reports_every_variant(tmp_path):
    assert cli(["--bench", "--device", "cpu", "--d-model", 16, "--n-layers", 1, "--n-heads", 2, "--image-size", 16,
                "--patch-size", 8, "--batch-size", 2, "--bench-steps", 1, "--bench-rounds", 1,
                "--peak-tflops", 1.0, "--out", tmp_path / "b"]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = report["rows"]
    assert rows[0]["variant"].startswith("plain") and rows[0]["ratio_to_plain"] == 1.0 and len(rows) == 10
    assert report["tokens_per_image"] == 5 and all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    # F = n (6 N + 12 L n d) for the plain model: N = 192·16 patch + 4·16² attention + 2·16·64 MLP + 16·1000 head
    assert rows[0]["gflop_per_image"] * 1e9 == pytest.approx(5 * (6 * (192 * 16 + 4 * 256 + 2 * 1024 + 16000)
                                                                   + 12 * 1 * 5 * 16))


def test_compare_runs_every_pe_and_tabulates(tmp_path):
    out = tmp_path / "cmp"
    common = ["--data", _cifar_archive(tmp_path / "c.tar.gz"), "--patch-size", 8, "--steps", 2, "--eval-every", 0, *TINY]
    # one run made in-process beforehand (compare keeps finished runs), one launched as a process
    assert cli([*common, "--pe", "none", "--seed", 0, "--out", tmp_path / "runs" / "none-seed0"]) == 0
    assert cli(["--compare", "none,rope-axial", "--seeds", 1, "--jobs", 1, "--out", out,
                "--runs-dir", tmp_path / "runs", *common]) == 0
    assert (tmp_path / "runs" / "rope-axial-seed0" / "summary.json").exists()
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["pe"], r["seed"]) for r in rows] == [("none", "0"), ("rope-axial", "0")]
    assert "| rope-axial |" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0


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
    "unknown bench variant": (["--bench", "--bench-variants", "plain,rope"], "unknown --bench-variants"),
    "unknown compare pe": (["--compare", "none,rope2d"], "unknown PE"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("hello")
    raw = _cifar_archive(d / "good.tar.gz").read_bytes()
    (d / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
    (d / "empty" / "train" / "cat").mkdir(parents=True)
    (d / "empty" / "val" / "cat").mkdir(parents=True)
    (d / "noval" / "train" / "cat").mkdir(parents=True)
    (d / "noval" / "train" / "cat" / "x.png").write_bytes(_jpeg_bytes((1, 2, 3), fmt="PNG"))
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
