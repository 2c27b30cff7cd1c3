"""data/images.py: the embedded task's labels follow the arrangement while patch contents do not;
the transforms do what their formulas say; the folder and CIFAR-10 loaders read small files of the
real formats (a corrupt image is skipped and counted, a pickle that would run code is refused).
The helpers image_bytes and cifar_archive (small files of the real formats) are also used by
test_train_vit.py and test_compare_vit.py."""
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_vit
import training
from data import images

CPU = training.Runtime(device=torch.device("cpu"))


def tiny_cfg(**over):
    cfg = dict(image_size=32, patch_size=8, n_classes=4, d_model=16, n_layers=1, n_heads=2, mlp_ratio=2.0,
               pe="learned", pool="cls", lam=0.0, lam_mode="identity", regime="free", dropout=0.0,
               drop_path=0.0, rope_base=100.0, lr=1e-2, beta2=0.99, weight_decay=0.0)
    return cfg | over


# -- the embedded task ---------------------------------------------------------------------------------
def test_shapes_labels_follow_the_arrangement_and_patch_contents_do_not():
    x, y = images.make_shapes(400, seed=3)
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


def _sector(dr, dc):
    """An independent reading of the 8 compass sectors: the angle in degrees, counter-clockwise from
    east with rows counted downwards, cut at ±22.5°, ±67.5°, … (0 = E, 2 = N, 4 = W, 6 = S)."""
    deg = np.degrees(np.arctan2(-dr, dc)) % 360.0
    return int(((deg + 22.5) % 360.0) // 45.0)


def test_shapes_hard_labels_are_the_relation_of_b_seen_from_a():
    # without noise and decoys the sprites can be read back: A has 25 bright pixels, B 9
    x, y = images.make_shapes_hard(300, seed=5, distractors=0, noise=0.0)
    assert x.shape == (300, 3, 48, 48) and x.dtype == np.uint8
    bright = x.max(1) >= 110
    for i in range(300):
        counts = bright[i].reshape(6, 8, 6, 8).sum((1, 3))
        (ra, ca), (rb, cb) = np.argwhere(counts == 25)[0], np.argwhere(counts == 9)[0]
        dr, dc = rb - ra, cb - ca
        assert y[i] == 2 * _sector(dr, dc) + (max(abs(dr), abs(dc)) > 2), (i, dr, dc, y[i])
    # every one of the 16 relations occurs, about equally often; the data are a function of the seed
    x, y = images.make_shapes_hard(3200, seed=1)
    counts = np.bincount(y, minlength=16)
    assert counts.min() > 0.75 * 200 and counts.max() < 1.25 * 200
    x2, y2 = images.make_shapes_hard(3200, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # the decoys and the noise do not depend on the label: bright pixels per image, by class
    per_img = (x.max(1) >= 110).sum((1, 2))
    means = [per_img[y == k].mean() for k in range(16)]
    assert max(means) - min(means) < 0.15 * np.mean(means)
    with pytest.raises(ValueError, match="grid ≥ 4"):
        images.make_shapes_hard(4, seed=0, grid=3)


# -- the transforms -------------------------------------------------------------------------------
def test_crops_flips_mixing_and_smoothing_follow_their_formulas():
    rng = np.random.default_rng(0)
    boxes, flips = images.sample_crops(rng, 2000, 48, 64, 0.25, 0.5)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    frac = h * w / (48 * 64)
    assert frac.min() > 0.22 and frac.max() <= 1.0 and 0.45 < flips.mean() < 0.55
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    # the affine resampler: a box at scale 1 is the slice itself, a flip is torch.flip
    x = torch.rand(3, 3, 16, 16)
    box = np.array([[4, 2, 8, 8], [0, 8, 8, 8], [8, 0, 8, 8]])
    out = images.crop_resize_tensor(x, box, np.array([False, True, False]), 8)
    torch.testing.assert_close(out[0], x[0, :, 4:12, 2:10])
    torch.testing.assert_close(out[1], x[1, :, 0:8, 8:16].flip(-1))
    torch.testing.assert_close(out[2], x[2, :, 8:16, 0:8])
    # a whole-image box resized to half size is the 2×2 average (bilinear at the right centres)
    half = images.crop_resize_tensor(x, np.tile([0, 0, 16, 16], (3, 1)), np.zeros(3, bool), 8)
    torch.testing.assert_close(half, F.avg_pool2d(x, 2))
    # label smoothing, mixup, cutmix
    y = torch.tensor([0, 1, 2, 3])
    t = images.soft_targets(y, 4, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(4)) and t[0, 0] == pytest.approx(0.9 + 0.025)
    imgs = torch.arange(4.0)[:, None, None, None].expand(4, 3, 10, 10).contiguous()
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0)):
        xm, tm = images.mix_batch(imgs, t, np.random.default_rng(5), mixup, cutmix)
        # image 0's pixels are a λ-mix of images 0 and 3; its target mixes the same way
        share_of_3 = (xm[0] / 3.0).mean().item()
        torch.testing.assert_close(tm[0], (1 - share_of_3) * t[0] + share_of_3 * t[3])
        assert torch.allclose(tm.sum(1), torch.ones(4))
        if cutmix:                                                   # pixels are copied, not blended
            assert set(xm[0].unique().tolist()) <= {0.0, 3.0}


# -- loaders on small files of the real formats ---------------------------------------------------------
def image_bytes(rgb, size=(40, 30), fmt="JPEG", mode="RGB"):
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
                (d / f"{c}_{i}.JPEG").write_bytes(image_bytes(rgb, size=(40 + 8 * i, 30)))
    (root / "train" / "red" / "grey.png").write_bytes(image_bytes((200, 200, 200), fmt="PNG", mode="L"))
    (root / "train" / "blue" / "alpha.png").write_bytes(image_bytes((30, 40, 220), fmt="PNG", mode="RGBA"))
    (root / "train" / "blue" / "broken.JPEG").write_bytes(b"this is not a JPEG at all")
    (root / "train" / "red" / "cut.JPEG").write_bytes(image_bytes((220, 30, 40))[:300])
    (root / "train" / "red" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def test_folder_loader_reads_real_files_and_skips_corrupt_ones(image_folder):
    data = images.load_data(str(image_folder), Path("unused"))
    assert data.classes == ["blue", "red"] and data.n_train == 10 and data.n_val == 4
    cfg = dict(tiny_cfg(), batch_size=10, grad_accum=1, steps=3, seed=0, label_smoothing=0.0, mixup=0.0,
               cutmix=0.0, crop_min_scale=0.3, hflip=0.5, image_size=16)
    seen = []
    for workers in (0, 2):
        batches = images.Batches(data, cfg, CPU, 10, workers=workers)
        steps = [batches(s, 0) for s in range(3)]
        seen.append(steps)
        assert len(batches.unreadable) == 2 and {Path(p).name for p in batches.unreadable} == {"broken.JPEG", "cut.JPEG"}
    for (x0, t0), (x1, t1) in zip(*seen):                       # workers do not change the batches
        assert torch.equal(x0, x1) and torch.equal(t0, t1)
    for x, t in seen[0]:
        assert x.shape == (10, 3, 16, 16)
        rgb = x.mean((2, 3)) * torch.tensor(images.IMAGENET_NORM[1]) + torch.tensor(images.IMAGENET_NORM[0])
        label = t.argmax(1)
        colourful = (rgb[:, 0] - rgb[:, 2]).abs() > 0.3              # not the grey PNG
        assert ((rgb[:, 2] > rgb[:, 0]) == (label == 0))[colourful].all()   # blue ⇔ class 0
    # a loader restarted at step 2 (resume) gives step 2's batch
    again = images.Batches(data, cfg, CPU, 10, workers=0)(2, 0)
    assert torch.equal(again[0], seen[0][2][0])
    # evaluation: the centre crops of all four validation images
    model = train_vit.build_vit(dict(cfg, n_classes=2, patch_size=8)).eval()
    with torch.no_grad():
        ev = train_vit.evaluate(model, data, dict(cfg, n_classes=2), CPU, batch=3)
    assert set(ev) == {"loss", "top1"} and ev["top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)


def test_folder_errors_are_clear(image_folder, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train/ is missing|train is missing"):
        images.load_data(str(tmp_path), Path("unused"))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.txt").write_text("x")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folder .*cat holds no images"):
        images.load_data(str(tmp_path), Path("unused"))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ValueError, match="needs Pillow"):
        images.load_data(str(image_folder), Path("unused"))


def cifar_archive(path, n_per_batch=6, bad_member=None):
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


def test_cifar10_loader_reads_the_real_format(tmp_path):
    path = cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    d = images.load_data(str(path), tmp_path)
    assert d.train_x.shape == (30, 3, 32, 32) and d.val_x.shape == (6, 3, 32, 32) and d.classes[9] == "truck"
    assert tuple(d.train_x[0, :, 3, 3]) == (255, 0, 128) and d.train_x[0, 0, 0, 5] == 7
    # a pickle that would run code is refused, not executed
    cifar_archive(tmp_path / "evil.tar.gz", bad_member=pickle.dumps({"data": _Evil()}, protocol=2))
    with pytest.raises(ValueError, match="never does"):
        images.load_data(str(tmp_path / "evil.tar.gz"), tmp_path)
