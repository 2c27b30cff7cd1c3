"""train_vit.py -- vision transformers built from ode_attention.Block, with 2-D positional
encodings, the λ-term and definiteness-constrained attention.

    python train_vit.py                                       # embedded "shapes" data, CPU, minutes
    python train_vit.py --pe none                             # ... and watch it stay at chance (25%)
    python train_vit.py --data cifar10 --preset cifar10       # downloads CIFAR-10 (163 MB)
    torchrun --nproc_per_node 4 train_vit.py --preset deit-tiny --data /data/imagenet --regime divergent
    python train_vit.py --bench                               # images/s of every variant, as ratios
    python train_vit.py --compare none,learned,rope-axial --seeds 3 --out results/vit   # top-1 table

The model (ViT / DeiT, pre-LN)
------------------------------
An image of H × W pixels is cut into a g_h × g_w grid of p × p patches (H = g_h p, W = g_w p),
patch (r, c) flattened to a row u_rc ∈ R^{3p²} and embedded linearly (a Conv2d with kernel =
stride = p, written as the matrix product it is):

    x⁰_rc = u_rc E + b                 E ∈ R^{3p² × d}
    X⁰ = [ x_cls ; x⁰_11 ; … ; x⁰_{g_h g_w} ]      (--pool cls: a learned class token first)

Positional encodings (--pe), the 2-D counterparts of train_lm.py's:
    none        nothing: the model sees a SET of patches (tested: permuting the patches permutes
                the patch outputs and leaves the class token's output unchanged)
    learned     x⁰_rc += P_{rc}, one free row per patch (rope.LearnedPE; DeiT's pos_embed)
    sin2d       x⁰_rc += [sin-cos(r) | sin-cos(c)] (rope.sinusoidal_pe_2d; MAE's fixed table)
    rope-axial  inside every attention layer, the first half of each head's query/key features is
                rotated by the row r, the second half by the column c (rope.apply_rope_2d):
                    (q R(r,c)ᵀ)·(k R(r',c')ᵀ) = q R(r'−r, c'−c) kᵀ        relative in both axes
    rope-mixed  pair k of head h rotated by r θʸ_hk + c θˣ_hk with LEARNED frequencies
                (rope.RoPEMixed, Heo et al. 2024): still relative, and able to mix the axes.
The class token carries no absolute PE (it is a free parameter: a PE on it would be redundant)
and is not rotated by 2-D RoPE, which is the same as placing it at (0, 0): its logits with patch
(r, c) see (r, c) itself.  So a RoPE model is exactly translation-invariant with --pool mean
(only offsets between patches exist; tested), and sees absolute positions through the class token
with --pool cls.

Then L blocks, each one Euler step of the attention field plus an MLP (ode_attention.Block):

    Xˡ⁺¹ = Xˡ + DropPath(Attn(LN(Xˡ))),   Xˡ⁺¹ ← Xˡ⁺¹ + DropPath(MLP(LN(Xˡ⁺¹)))

with head h's logits sᵢⱼ = [ (xᵢQₕ)Rᵢᵀ·(xⱼKₕ)Rⱼᵀ + λₕ xᵢ⁽ʰ⁾ᵀMₕxⱼ⁽ʰ⁾ ] / √d_h — the λ-term (--lam,
--lam-mode) and the constrained regimes (--regime) exactly as in train_lm.py. Stochastic depth
grows linearly with depth, p_l = drop_path · l / (L − 1) (DeiT / timm). Output: LN, then the
class token's row (--pool cls) or the mean of the patch rows (--pool mean), then a linear head.

Loss and metrics.  Targets are probability vectors y (label smoothing and mixup make them soft):
ℓ = −(1/B) Σ_b Σ_k y_bk ln softmax(z_b)_k.  Evaluation: top-1 and top-5 accuracy (%) and the
plain cross-entropy on the validation split, centre-cropped, no mixing, no smoothing.

The token probe (notes §5.4) and the regime report: after training, a fixed batch of validation
images runs through the model with full blocks and with attention-only updates x ← x + Attn(x),
recording per layer the mean token norm, Σᵢⱼ‖xᵢ − xⱼ‖², the mean cosine and the sharpness
(probe.csv, probe.png; training.token_probe, the same code as the language model); and every
layer's (Q, K, V, O) goes through regimes.analyse_layer (regimes.csv: inertia of W_sym and A_sym,
the layer's regime).

Data (--data)
-------------
shapes (default, embedded, no download)  32 × 32 RGB images generated from a fixed seed (20,000
    train, 2,000 validation), a 4 × 4 grid of 8 × 8 cells.  Each image holds a filled square (A)
    and a plus sign (B) in two cells of different rows and different columns, 0-2 hollow squares
    (distractors) in other cells, random bright colours, random offsets inside their cells, on
    dark noise.  The label is where B lies relative to A: up-left, up-right, down-left, down-right.
    Why position must matter: the CONTENT of every cell is drawn independently of WHERE the cell
    is, so the multiset of patches {A's, B's, distractors', background} has the same distribution
    for every class (for any patch size dividing 8).  A model without positions sees only that
    multiset and cannot beat chance (25%); a model with a PE can.  No flips, no crops by default:
    a flip changes the label.
cifar10  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a,
    published on the CIFAR page), its python pickle batches read with a numpy-only unpickler:
    50,000 train / 10,000 test images (the test batch is the "val" split here, as is customary).
    A local copy of the archive can be passed as --data PATH.tar.gz.
PATH     an ImageNet-style folder: PATH/train/<class>/*.JPEG and PATH/val/<class>/*.JPEG (any of
    .jpeg .jpg .png .bmp .webp .ppm .tif .gif), classes = the train/ folder names sorted,
    decoded with Pillow in DataLoader workers (--workers).  A missing folder or an empty class is
    an error before training starts; an unreadable image is skipped, counted and named (once on
    the console, and in summary.json): in training the next file of the list takes its place in
    the batch, in evaluation it is left out (metrics.csv counts it as "unreadable").

Transforms (section 2, written once): random-resized-crop (Inception / torchvision: area fraction
s ~ U(scale), log aspect ~ U(log ratio), 10 tries, else the centre crop), horizontal flip,
normalisation, mixup / cutmix (timm's batch mode) and label smoothing.  DeiT's recipe also uses
RandAugment, random erasing, repeated augmentation and a model EMA: not implemented here.

Batches are a pure function of (seed, step): global sample slot g = step·B + j goes to epoch
⌊g / N⌋ and position g mod N of that epoch's permutation, and every random crop / flip / mix is
drawn from a generator seeded by its slot, so `--resume` and any number of DataLoader workers or
processes give the same batches (and, on CPU, the same losses bit for bit; tested).

Run folder (--out, default runs/vit-…): config.json, versions.json, metrics.csv, loss.png, ckpt.pt,
probe.csv, probe.png, regimes.csv, summary.json.  The checkpoint's "config" holds everything
needed to rebuild the model; block i's attention is `blocks.{i}.attn.*` in its state dict.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import pickle
import signal
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ode_attention
import regimes
import rope as rope_mod
import training
from data import download as data_download
# the token probe and its figure are the language model's, reused as they are (see the report)

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Defaults: the small CPU preset (used when no --preset is given), a CIFAR-10 preset (ours, not
# tuned, not from the paper) and DeiT-Tiny / DeiT-Small at 224 px (notes §4.2: the paper's
# ImageNet run is DeiT-Tiny, 300 epochs, AdamW 1e-3 at batch 1024, wd 0.05, 5 warmup epochs,
# label smoothing 0.1, drop-path 0.1, mixup 0.8 / cutmix 1.0, min lr 1e-5).  Schedules are given
# in steps (steps, warmup, eval_every) or, where those are None, in epochs.
# ----------------------------------------------------------------------------------------------
_DEIT = dict(data=None, image_size=224, patch_size=16, pe="learned", pool="cls", mlp_ratio=4.0,
             batch_size=1024, grad_accum=1, steps=None, epochs=300.0, warmup=None, warmup_epochs=5.0,
             lr=1e-3, min_lr=1e-5, beta2=0.999, weight_decay=0.05, clip=0.0, dropout=0.0,
             drop_path=0.1, label_smoothing=0.1, mixup=0.8, cutmix=1.0, crop_min_scale=0.08,
             hflip=0.5, eval_every=None, eval_images=0)
PRESETS = {
    "small": dict(data="shapes", image_size=32, patch_size=8, pe="rope-axial", pool="cls",
                  d_model=64, n_layers=4, n_heads=4, mlp_ratio=2.0, batch_size=128, grad_accum=1,
                  steps=1000, epochs=None, warmup=50, warmup_epochs=None, lr=2e-3, min_lr=1e-5,
                  beta2=0.99, weight_decay=0.05, clip=1.0, dropout=0.0, drop_path=0.0,
                  label_smoothing=0.0, mixup=0.0, cutmix=0.0, crop_min_scale=1.0, hflip=0.0,
                  eval_every=250, eval_images=2000),
    "cifar10": dict(data="cifar10", image_size=32, patch_size=4, pe="rope-axial", pool="cls",
                    d_model=192, n_layers=6, n_heads=3, mlp_ratio=2.0, batch_size=128, grad_accum=1,
                    steps=None, epochs=50.0, warmup=None, warmup_epochs=5.0, lr=1e-3, min_lr=1e-5,
                    beta2=0.999, weight_decay=0.05, clip=1.0, dropout=0.0, drop_path=0.1,
                    label_smoothing=0.1, mixup=0.0, cutmix=0.0, crop_min_scale=0.35, hflip=0.5,
                    eval_every=None, eval_images=0),
    "deit-tiny": dict(_DEIT, d_model=192, n_layers=12, n_heads=3),
    "deit-small": dict(_DEIT, d_model=384, n_layers=12, n_heads=6),
}
PES = ("none", "learned", "sin2d", "rope-axial", "rope-mixed")
POOLS = ("cls", "mean")
LAM_MODES = ode_attention.LAM_MODES          # ("identity", "softplus-diag")
REGIMES = ode_attention.REGIMES              # ("free", "divergent", "intermediate", "convergent")
# a checkpoint may only be resumed by a command that agrees on these
RESUME_KEYS = ("data", "pe", "pool", "lam", "lam_mode", "regime", "d_model", "n_layers", "n_heads",
               "mlp_ratio", "image_size", "patch_size", "rope_base", "dropout", "drop_path",
               "n_classes", "batch_size", "seed", "label_smoothing", "mixup", "cutmix",
               "crop_min_scale", "hflip")
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
# per-channel mean / std of pixels in [0, 1]
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SHAPES_NORM = ((0.11, 0.11, 0.11), (0.15, 0.15, 0.15))   # measured on the generated train split
EVAL_CROP = 0.875                                          # resize to S / 0.875, centre-crop S (DeiT)


# ==============================================================================================
# 1. Data
# ==============================================================================================
@dataclass
class ArrayData:
    """A dataset held in memory as uint8 (N, 3, H, W) arrays (shapes, CIFAR-10)."""
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: list
    norm: tuple

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_val(self) -> int:
        return len(self.val_y)


# -- the embedded dataset -----------------------------------------------------------------------
SHAPES_CLASSES = ["up-left", "up-right", "down-left", "down-right"]   # where B lies, seen from A
SHAPES_SIZES = dict(train=20000, val=2000)
SHAPES_SEEDS = dict(train=0, val=1)           # the data are fixed: --seed changes training only
_S = 5                                        # sprite size (pixels) inside an 8 × 8 cell
_MID = np.arange(_S) == _S // 2
_SPRITES = {
    "square": np.ones((_S, _S), bool),                                      # A: filled square
    "plus": _MID[:, None] | _MID[None, :],                                  # B: plus sign
    "ring": ~np.pad(np.ones((_S - 2, _S - 2), bool), 1),                    # distractor: hollow square
}


def make_shapes(n: int, seed: int, *, grid: int = 4, cell: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 (n, 3, grid·cell, grid·cell)) and labels (int64 (n,)) of the shapes task.

    label = 2·[row_B > row_A] + [col_B > col_A]   (rows and columns of A and B differ)
    Every sprite's pixels, colour and offset inside its cell are drawn independently of the cell,
    so a model blind to positions sees the same distribution of patches for every label."""
    if grid < 2 or cell < _S:
        raise ValueError(f"the shapes task needs grid ≥ 2 and cells of at least {_S} pixels")
    rng = np.random.default_rng([seed, 12345])
    size = grid * cell
    # background: dark noise, uniform in [0, 40]
    img = rng.integers(0, 41, size=(n, size, size, 3), dtype=np.uint8)
    label = rng.integers(0, 4, size=n)
    below, right = label // 2, label % 2
    # two distinct rows r₁ < r₂ (and columns): A takes the first unless B must be above (left)
    rows = np.sort(np.argsort(rng.random((n, grid)), axis=1)[:, :2], axis=1)
    cols = np.sort(np.argsort(rng.random((n, grid)), axis=1)[:, :2], axis=1)
    ar, br = np.where(below == 1, rows[:, 0], rows[:, 1]), np.where(below == 1, rows[:, 1], rows[:, 0])
    ac, bc = np.where(right == 1, cols[:, 0], cols[:, 1]), np.where(right == 1, cols[:, 1], cols[:, 0])
    # distractors: up to 2 ring sprites in random cells other than A's and B's
    cell_a, cell_b = ar * grid + ac, br * grid + bc
    score = rng.random((n, grid * grid))
    score[np.arange(n), cell_a] = score[np.arange(n), cell_b] = 2.0           # never chosen
    free = np.argsort(score, axis=1)[:, :2]
    n_dis = rng.integers(0, 3, size=n)
    objects = [("square", cell_a, np.ones(n, bool)), ("plus", cell_b, np.ones(n, bool)),
               ("ring", free[:, 0], n_dis >= 1), ("ring", free[:, 1], n_dis >= 2)]
    ii = np.arange(n)[:, None, None]
    dy, dx = np.arange(_S)[None, :, None], np.arange(_S)[None, None, :]
    for kind, where, present in objects:
        # top-left pixel = cell corner + a random offset in [0, cell − S]
        y0 = (where // grid) * cell + rng.integers(0, cell - _S + 1, size=n)
        x0 = (where % grid) * cell + rng.integers(0, cell - _S + 1, size=n)
        colour = rng.integers(110, 256, size=(n, 3), dtype=np.uint8)
        yy, xx = y0[:, None, None] + dy, x0[:, None, None] + dx
        paint = _SPRITES[kind][None] & present[:, None, None]                  # (n, S, S)
        img[ii, yy, xx] = np.where(paint[..., None], colour[:, None, None, :], img[ii, yy, xx])
    return np.ascontiguousarray(img.transpose(0, 3, 1, 2)), label.astype(np.int64)


@functools.lru_cache(maxsize=2)
def shapes_data() -> ArrayData:
    tx, ty = make_shapes(SHAPES_SIZES["train"], SHAPES_SEEDS["train"])
    vx, vy = make_shapes(SHAPES_SIZES["val"], SHAPES_SEEDS["val"])
    return ArrayData("shapes", tx, ty, vx, vy, list(SHAPES_CLASSES), SHAPES_NORM)


# -- CIFAR-10 -----------------------------------------------------------------------------------
CIFAR10 = dict(urls=["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
               file="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; unpickling can run arbitrary code, so only the globals a
    pickled numpy array needs are allowed (anything else is a ValueError, not an execution)."""
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        module = module.replace("numpy.core", "numpy._core")     # pickles written by numpy < 2
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"the pickle asks for {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _cifar_batch(tar: tarfile.TarFile, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: 'data' (N, 3072) uint8 = 1024 red, 1024 green, 1024 blue values per image, each
    plane row-major 32 × 32; 'labels' N integers in 0..9."""
    try:
        raw = tar.extractfile(tar.getmember(member)).read()
    except KeyError:
        raise ValueError(f"{path} has no {member}: it is not the CIFAR-10 python archive") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path} is corrupt or truncated: reading {member} failed ({e})") from None
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: {member} is not a readable CIFAR batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or \
            (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        raise ValueError(f"{path}: {member} does not hold N × 3072 pixels and N labels in 0..9")
    # (N, 3072) → (N, 3, 32, 32): channel planes, then rows, then columns
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: Path) -> ArrayData:
    """The CIFAR-10 python archive: data_batch_1..5 → train, test_batch → val."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path} is not a readable .tar.gz archive ({e}): it is corrupt or truncated") from None
    with tar:
        root = "cifar-10-batches-py"
        parts = [_cifar_batch(tar, f"{root}/data_batch_{i}", path) for i in range(1, 6)]
        vx, vy = _cifar_batch(tar, f"{root}/test_batch", path)
        classes = [f"class{i}" for i in range(10)]
        try:  # the class names, if the meta file is there
            meta = _NumpyOnlyUnpickler(tar.extractfile(f"{root}/batches.meta"), encoding="latin1").load()
            classes = [str(c) for c in meta["label_names"]][:10] or classes
        except (KeyError, ValueError, pickle.UnpicklingError, EOFError, TypeError, tarfile.TarError, OSError):
            pass
    tx = np.concatenate([p[0] for p in parts])
    ty = np.concatenate([p[1] for p in parts])
    return ArrayData("cifar10", tx, ty, vx, vy, classes, CIFAR_NORM)


# -- ImageNet-style folders ---------------------------------------------------------------------
def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading an image folder needs Pillow, which is not installed: "
                         "pip install pillow (it is listed in requirements-extra.txt)") from None
    return Image


@dataclass
class FolderData:
    name: str
    root: Path
    train: list                # [(path, label)], sorted by class then file name
    val: list
    classes: list
    norm: tuple = IMAGENET_NORM

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val)


def _scan_split(split_dir: Path, classes: list | None) -> tuple[list, list]:
    if not split_dir.is_dir():
        raise ValueError(f"{split_dir} is missing: an ImageNet-style folder holds "
                         f"train/<class>/*.JPEG and val/<class>/*.JPEG")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not found:
        raise ValueError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/*.JPEG)")
    if classes is None:
        classes = found
    elif extra := sorted(set(found) - set(classes)):
        raise ValueError(f"{split_dir} has a class folder {extra[0]!r} that train/ lacks")
    items = []
    for label, c in enumerate(classes):
        if not (split_dir / c).is_dir():
            continue                        # a validation split may lack a class
        files = sorted(e.path for e in os.scandir(split_dir / c)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
        if not files:
            raise ValueError(f"the class folder {split_dir / c} holds no images "
                             f"({' '.join(IMAGE_EXTS)})")
        items.extend((f, label) for f in files)
    return items, classes


def scan_folder(root: Path) -> FolderData:
    """ImageNet layout: classes are the sub-folders of train/, sorted by name."""
    _pillow()
    train, classes = _scan_split(root / "train", None)
    val, _ = _scan_split(root / "val", classes)
    return FolderData(root.name, root, train, val, classes)


def load_data(data: str, cache_dir: Path):
    """--data: shapes, cifar10 (downloaded and verified into cache_dir), a CIFAR-10 archive, or an
    ImageNet-style folder."""
    if data == "shapes":
        return shapes_data()
    if data == "cifar10":
        return load_cifar10(data_download.download(CIFAR10["urls"], cache_dir / CIFAR10["file"], md5=CIFAR10["md5"]))
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {data!r} is neither a known dataset (shapes, cifar10) nor an existing "
                         f"folder or archive")
    if path.is_dir():
        return scan_folder(path)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar10(path)
    raise ValueError(f"--data {data} is a file but not a CIFAR-10 .tar.gz archive: pass a folder "
                     f"with train/<class>/ and val/<class>/ for your own images")


# ==============================================================================================
# 2. Transforms: random-resized-crop, flip, normalisation, mixup / cutmix, label smoothing
# ==============================================================================================
CROP_RATIO = (3 / 4, 4 / 3)


def sample_crops(rng: np.random.Generator, k: int, h: int, w: int, min_scale: float, hflip: float,
                 tries: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """k random-resized-crop boxes (top, left, height, width) of an h × w image, and k flips.

    Inception-style: area a = s·h·w with s ~ U(min_scale, 1), aspect ρ = e^u with
    u ~ U(ln ¾, ln 4⁄3); width = √(aρ), height = √(a/ρ); the first of `tries` draws that fits is
    kept, else the centre crop with ρ clamped to [¾, 4⁄3].  min_scale ≥ 1: the whole image."""
    flips = rng.random(k) < hflip
    if min_scale >= 1.0:
        return np.tile(np.array([0, 0, h, w]), (k, 1)), flips
    area = h * w * rng.uniform(min_scale, 1.0, size=(k, tries))                 # a = s h w
    rho = np.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), size=(k, tries)))
    cw, ch = np.rint(np.sqrt(area * rho)).astype(int), np.rint(np.sqrt(area / rho)).astype(int)
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = ok.argmax(1)
    cw, ch = cw[np.arange(k), first], ch[np.arange(k), first]
    u = rng.random((k, 2))
    top, left = (u[:, 0] * (h - ch + 1)).astype(int), (u[:, 1] * (w - cw + 1)).astype(int)
    # fallback: the largest centre crop with an aspect ratio inside the range
    bad = ~ok.any(1)
    if bad.any():
        r = w / h
        fw, fh = (int(round(h * CROP_RATIO[1])), h) if r > CROP_RATIO[1] else \
                 (w, int(round(w / CROP_RATIO[0]))) if r < CROP_RATIO[0] else (w, h)
        cw[bad], ch[bad], top[bad], left[bad] = fw, fh, (h - fh) // 2, (w - fw) // 2
    return np.stack((top, left, ch, cw), 1), flips


def crop_resize_tensor(x: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """Crop box b of image b, resize it to size × size (bilinear), mirror it where flips[b]: all at
    once with an affine sampling grid.  In grid_sample's coordinates (−1 … 1 across the image,
    align_corners=False) a box of width w at `left` in an image of width W is
        x_in = a x_out + c,   a = w / W,   c = (2 left + w) / W − 1      (a → −a mirrors it)
    and likewise for y.  (No antialiasing: meant for small in-memory images.)"""
    B, _, H, W = x.shape
    if size == H == W and not flips.any() and (boxes == np.array([0, 0, H, W])).all():
        return x
    top, left, h, w = (torch.as_tensor(boxes[:, i], dtype=torch.float32, device=x.device) for i in range(4))
    sign = 1.0 - 2.0 * torch.as_tensor(flips, dtype=torch.float32, device=x.device)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0] = sign * w / W                                   # a_x (negative: mirrored)
    theta[:, 0, 2] = (2 * left + w) / W - 1                         # c_x
    theta[:, 1, 1] = h / H                                          # a_y
    theta[:, 1, 2] = (2 * top + h) / H - 1                          # c_y
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pil_train_image(img, rng: np.random.Generator, size: int, min_scale: float, hflip: float) -> np.ndarray:
    """Random-resized-crop (bicubic) and flip of one PIL image → uint8 (3, size, size)."""
    Image = _pillow()
    (top, left, h, w), = sample_crops(rng, 1, img.height, img.width, min_scale, 0.0)[0]
    img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def pil_eval_image(img, size: int) -> np.ndarray:
    """Resize the shorter side to size / 0.875 (bicubic), centre-crop size × size."""
    Image = _pillow()
    short = int(round(size / EVAL_CROP))
    scale = short / min(img.width, img.height)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)


def normalise(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """Pixels 0 … 255 (uint8 or float) → (x / 255 − μ_c) / σ_c per channel."""
    mean = torch.tensor(norm[0], device=x.device)[None, :, None, None]
    std = torch.tensor(norm[1], device=x.device)[None, :, None, None]
    return (x.float() / 255.0 - mean) / std


def soft_targets(y: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    """Label smoothing: ỹ = (1 − ε) onehot(y) + ε / K."""
    return F.one_hot(y, n_classes).float() * (1.0 - smoothing) + smoothing / n_classes


def mix_batch(x: torch.Tensor, t: torch.Tensor, rng: np.random.Generator, mixup: float,
              cutmix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup / CutMix with the batch reversed as partner (timm's "batch" mode); when both are on,
    each batch uses one of them with probability ½.  λ ~ Beta(α, α).
        mixup:   x ← λ x + (1 − λ) x_rev
        cutmix:  a box of area (1 − λ)·H·W (centre uniform, clipped) is pasted from x_rev, and
                 λ ← 1 − box area / (H W)
        targets: t ← λ t + (1 − λ) t_rev"""
    if mixup <= 0 and cutmix <= 0:
        return x, t
    use_cut = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cut else mixup
    lam = float(rng.beta(alpha, alpha))
    xr = x.flip(0)
    if use_cut:
        H, W = x.shape[-2:]
        # box side lengths √(1 − λ)·H × √(1 − λ)·W, centre (cy, cx) uniform in the image
        bh, bw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, H)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = xr[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)                   # the box actually pasted
    else:
        x = lam * x + (1.0 - lam) * xr
    return x, lam * t + (1.0 - lam) * t.flip(0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ = −(1/B) Σ_b Σ_k t_bk ln softmax(z_b)_k  (float32 even under bf16 autocast)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ==============================================================================================
# 3. Batches: a pure function of (seed, step)
# ==============================================================================================
@functools.lru_cache(maxsize=4)
def _epoch_perm(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(n)


def global_indices(step: int, *, global_batch: int, n: int, seed: int) -> np.ndarray:
    """Dataset index of each slot j of the global batch: slot g = step·B + j is position g mod N
    of epoch ⌊g / N⌋'s permutation (every example once per epoch)."""
    g = step * global_batch + np.arange(global_batch)
    epoch, pos = g // n, g % n
    out = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epoch):
        out[epoch == e] = _epoch_perm(seed, int(e), n)[pos[epoch == e]]
    return out


def my_slots(rt: training.Runtime, micro: int, m: int) -> slice:
    """Micro-batch m of rank r takes the slots (m W + r) b … (m W + r + 1) b − 1 of the global batch."""
    lo = (m * rt.world_size + rt.rank) * micro
    return slice(lo, lo + micro)


class Batches:
    """batch_fn(step, micro) for training.train_loop: (normalised images, soft targets) on the
    device.  In-memory data are cropped on the device; folders are decoded by DataLoader workers."""

    def __init__(self, data, cfg: dict, rt: training.Runtime, micro: int, *, workers: int = 0):
        self.data, self.cfg, self.rt, self.micro, self.workers = data, cfg, rt, micro, workers
        self.B, self.seed = cfg["batch_size"], cfg["seed"]
        self._it, self._next = None, None
        self.unreadable: set = set()

    def _finish(self, x_uint8, y, step, m):
        """Normalise, smooth, mix: the same for both sources."""
        c = self.cfg
        x = normalise(x_uint8.to(self.rt.device, non_blocking=True), self.data.norm)
        t = soft_targets(y.to(self.rt.device), c["n_classes"], c["label_smoothing"])
        rng = np.random.default_rng([self.seed, 13, step, m, self.rt.rank])
        return mix_batch(x, t, rng, c["mixup"], c["cutmix"])

    def __call__(self, step: int, m: int):
        if isinstance(self.data, FolderData):
            return self._from_loader(step, m)
        c = self.cfg
        sl = my_slots(self.rt, self.micro, m)
        idx = global_indices(step, global_batch=self.B, n=self.data.n_train, seed=self.seed)[sl]
        x = torch.from_numpy(self.data.train_x[idx]).to(self.rt.device)
        # crops and flips of the whole global batch, drawn from (seed, step); this rank's rows
        H, W = x.shape[-2:]
        boxes, flips = sample_crops(np.random.default_rng([self.seed, 11, step]), self.B, H, W,
                                    c["crop_min_scale"], c["hflip"])
        x = crop_resize_tensor(x.float(), boxes[sl], flips[sl], c["image_size"])     # pixels 0 … 255
        return self._finish(x, torch.from_numpy(self.data.train_y[idx]), step, m)

    def _from_loader(self, step: int, m: int):
        if self._it is None or self._next != (step, m):
            self._it = iter(folder_loader(self.data, self.cfg, self.rt, self.micro, step, self.workers))
        s, mm, x, y, bad = next(self._it)
        assert (s, mm) == (step, m), "the DataLoader ran out of step with the training loop"
        self._next = (step, m + 1) if m + 1 < self.cfg["grad_accum"] else (step + 1, 0)
        for path in bad:
            if path not in self.unreadable:
                self.unreadable.add(path)
                if self.rt.is_main:
                    tqdm.write(f"warning: skipped an unreadable image {path} ({len(self.unreadable)} so far)")
        return self._finish(x, y, step, m)


class FolderSet(torch.utils.data.Dataset):
    """Training items are (index, step, micro, slot) keys; an unreadable file is replaced by the
    next file of the list (up to 50 tries) and reported, so a batch keeps its full size.
    Evaluation items are plain indices; an unreadable file is dropped from the batch and reported
    (it counts in no denominator)."""

    def __init__(self, items: list, cfg: dict, train: bool):
        self.items, self.cfg, self.train = items, cfg, train

    def __len__(self):
        return len(self.items)

    def load(self, i: int, rng):
        Image = _pillow()
        bad = []
        for k in range(50 if self.train else 1):
            path, label = self.items[(i + k) % len(self.items)]
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")             # decodes; grey, CMYK, palette, alpha → RGB
                break
            except Exception:                          # any decoder failure: skip the file, count it
                bad.append(path)
        else:
            if not self.train:
                return None, label, bad
            raise ValueError(f"50 images in a row could not be read, starting at {self.items[i][0]}: "
                             f"is the folder readable and Pillow complete?")
        if self.train:
            arr = pil_train_image(im, rng, self.cfg["image_size"], self.cfg["crop_min_scale"], self.cfg["hflip"])
        else:
            arr = pil_eval_image(im, self.cfg["image_size"])
        return torch.from_numpy(arr.copy()), label, bad

    def __getitem__(self, key):
        if isinstance(key, tuple):                     # training: (index, step, micro, slot)
            i, step, m, slot = key
            img, label, bad = self.load(i, np.random.default_rng([self.cfg["seed"], 11, step, slot]))
            return img, label, bad, step, m
        img, label, bad = self.load(key, None)
        return img, label, bad, -1, -1


def _collate(items):
    """(step, micro, images, labels, unreadable paths); dropped (None) images leave the batch."""
    bad = [p for it in items for p in it[2]]
    step, micro = items[0][3], items[0][4]
    items = [it for it in items if it[0] is not None]
    if not items:
        return step, micro, torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), bad
    imgs, labels = zip(*[(it[0], it[1]) for it in items])
    return step, micro, torch.stack(imgs), torch.tensor(labels, dtype=torch.int64), bad


def _worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the main process's to handle


class _StepSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of keys, from (step, micro = 0) on."""

    def __init__(self, data, cfg, rt, micro, start):
        self.data, self.cfg, self.rt, self.micro, self.start = data, cfg, rt, micro, start

    def __iter__(self):
        c = self.cfg
        for step in range(self.start, c["steps"]):
            idx = global_indices(step, global_batch=c["batch_size"], n=self.data.n_train, seed=c["seed"])
            for m in range(c["grad_accum"]):
                sl = my_slots(self.rt, self.micro, m)
                yield [(int(i), step, m, sl.start + j) for j, i in enumerate(idx[sl])]

    def __len__(self):
        return (self.cfg["steps"] - self.start) * self.cfg["grad_accum"]


def _loader(dataset, workers: int, rt: training.Runtime, **kw):
    return torch.utils.data.DataLoader(dataset, num_workers=workers, collate_fn=_collate,
                                       pin_memory=rt.device.type == "cuda", worker_init_fn=_worker_init,
                                       prefetch_factor=4 if workers else None, **kw)


def folder_loader(data: FolderData, cfg, rt, micro, start, workers):
    return _loader(FolderSet(data.train, cfg, True), workers, rt,
                   batch_sampler=_StepSampler(data, cfg, rt, micro, start))


# ==============================================================================================
# 4. The model
# ==============================================================================================
def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, g_h g_w, 3p²): row-major patches (r, c) → r·g_w + c, each flattened as
    (channel, row, column) — the layout of a Conv2d(3, d, p, stride=p) weight."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


class ViT(nn.Module):
    """Patch embedding (+ absolute PE) → [class token] → L × ode_attention.Block → LN → pool → head."""

    def __init__(self, *, image_size: int, patch_size: int, n_classes: int, d_model: int, n_layers: int,
                 n_heads: int, mlp_ratio: float = 4.0, pe: str = "learned", pool: str = "cls",
                 lam: float = 0.0, lam_mode: str = "identity", regime: str = "free", dropout: float = 0.0,
                 drop_path: float = 0.0, rope_base: float = 100.0, qkv_bias: bool = True):
        super().__init__()
        if pe not in PES:
            raise ValueError(f"unknown --pe {pe!r}: choose one of {', '.join(PES)}")
        if pool not in POOLS:
            raise ValueError(f"unknown --pool {pool!r}: choose cls or mean")
        for name, v in (("--image-size", image_size), ("--patch-size", patch_size), ("classes", n_classes),
                        ("--d-model", d_model), ("--n-layers", n_layers), ("--n-heads", n_heads)):
            if v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if image_size % patch_size:
            raise ValueError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
        if d_model % n_heads:
            raise ValueError(f"--d-model {d_model} is not divisible by --n-heads {n_heads}")
        if pe == "sin2d" and d_model % 4:
            raise ValueError(f"--pe sin2d needs --d-model divisible by 4, got {d_model}")
        if pe in ("rope-axial", "rope-mixed") and (d_model // n_heads) % (4 if pe == "rope-axial" else 2):
            raise ValueError(f"--pe {pe} needs a head width d/H divisible by {4 if pe == 'rope-axial' else 2}, "
                             f"got {d_model // n_heads}")
        self.p, self.pe, self.pool = patch_size, pe, pool
        g = image_size // patch_size
        self.grid, self.n_patches = g, g * g
        self.patch = nn.Linear(3 * patch_size ** 2, d_model)                # u E + b
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        if pe == "learned":
            self.pos = rope_mod.LearnedPE(self.n_patches, d_model)
        elif pe == "sin2d":
            self.register_buffer("pos_table", rope_mod.sinusoidal_pe_2d(g, g, d_model), persistent=False)
        # (row, column) of every patch, row-major — what 2-D RoPE rotates by
        rc = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2)
        self.register_buffer("positions", rc, persistent=False)
        self.rope = pe in ("rope-axial", "rope-mixed")
        self.drop = nn.Dropout(dropout)
        # stochastic depth p_l = drop_path · l / (L − 1)
        rates = [drop_path * i / max(1, n_layers - 1) for i in range(n_layers)]
        self.blocks = nn.ModuleList(
            ode_attention.Block(d_model, n_heads, mlp_ratio=mlp_ratio, dropout=dropout, drop_path=r,
                                causal=False, pe=pe if self.rope else "none", rope_base=rope_base,
                                lam=lam, lam_mode=lam_mode, regime=regime, bias=qkv_bias)
            for r in rates)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        self._init()

    def _init(self) -> None:
        """N(0, 0.02²) for linear maps and the class token, zero biases (DeiT / timm); positions,
        RoPE-Mixed frequencies and the constrained attention keep their own inits."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls is not None:
            nn.init.normal_(self.cls, 0.0, 0.02)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """X⁰: patch embeddings (+ absolute PE), class token first."""
        if images.shape[-1] != self.grid * self.p or images.shape[-2] != self.grid * self.p:
            raise ValueError(f"images of {tuple(images.shape[-2:])} pixels, but the model takes "
                             f"{self.grid * self.p} × {self.grid * self.p}")
        x = self.patch(patchify(images, self.p))                              # x⁰_rc = u_rc E + b
        if self.pe == "learned":
            x = x + self.pos(self.n_patches)                                  # + P_rc
        elif self.pe == "sin2d":
            x = x + self.pos_table.to(x.dtype)                                # + [sc(r) | sc(c)]
        if self.cls is not None:
            x = torch.cat((self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        return self.drop(x)

    def hidden(self, images: torch.Tensor, *, attention_only: bool = False, record: list | None = None):
        """Residual stream after the last block (LN applied); `record` collects X⁰ … Xᴸ."""
        x = self.embed(images)
        pos = self.positions if self.rope else None   # the class token (if any) comes first: not rotated
        if record is not None:
            record.append(x)
        for block in self.blocks:
            x = block(x, positions=pos, attention_only=attention_only)
            if record is not None:
                record.append(x)
        return self.ln_f(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores z (B, K)."""
        h = self.hidden(images)
        feat = h[:, 0] if self.cls is not None else h.mean(1)                 # class token | mean
        return self.head(feat)


def build_vit(cfg: dict) -> ViT:
    """The model a config (or a checkpoint's "config") describes."""
    return ViT(image_size=cfg["image_size"], patch_size=cfg["patch_size"], n_classes=cfg["n_classes"],
               d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
               mlp_ratio=cfg["mlp_ratio"], pe=cfg["pe"], pool=cfg["pool"], lam=cfg["lam"],
               lam_mode=cfg["lam_mode"], regime=cfg["regime"], dropout=cfg["dropout"],
               drop_path=cfg["drop_path"], rope_base=cfg["rope_base"])


def make_optimizer(model: nn.Module, cfg: dict, device: torch.device):
    """AdamW; weight decay only on weight matrices: never on norms, biases, λ, the class token,
    the learned positions or RoPE-Mixed's frequencies (DeiT's no_weight_decay list)."""
    return training.make_adamw(model, lr=cfg["lr"], beta2=cfg["beta2"], weight_decay=cfg["weight_decay"],
                               device=device, keep=("freqs", "cls", "pos.weight"))


# ==============================================================================================
# 5. Evaluation, the token probe, the regime report
# ==============================================================================================
def _eval_batches(data, split: str, cfg: dict, rt: training.Runtime, batch: int, max_images: int,
                  workers: int):
    """This process's share (every W-th image) of the first max_images (0 = all) of a split, as
    (uint8 images, labels, unreadable paths) batches, centre-cropped."""
    n = data.n_val if split == "val" else data.n_train
    n = min(n, max_images) if max_images else n
    mine = np.arange(n)[rt.rank::rt.world_size]
    if isinstance(data, FolderData):
        items = data.val if split == "val" else data.train
        loader = _loader(FolderSet(items, cfg, False), workers, rt, batch_size=batch,
                         sampler=[int(i) for i in mine])
        for _, _, x, y, bad in loader:
            yield x, y, bad
        return
    xs, ys = (data.val_x, data.val_y) if split == "val" else (data.train_x, data.train_y)
    for i in range(0, len(mine), batch):
        x = torch.from_numpy(xs[mine[i: i + batch]])
        if x.shape[-1] != cfg["image_size"] or x.shape[-2] != cfg["image_size"]:
            x = F.interpolate(x.float(), size=cfg["image_size"], mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
        yield x, torch.from_numpy(ys[mine[i: i + batch]]), []


def evaluate(model: ViT, data, cfg: dict, rt: training.Runtime, *, split: str = "val", batch: int = 256,
             max_images: int = 0, workers: int = 0) -> dict:
    """loss (nats), top-1 and top-5 accuracy (%) over a split, shared between processes."""
    k5 = min(5, cfg["n_classes"])
    total = torch.zeros(5, dtype=torch.float64, device=rt.device)    # [Σ nll, top1, top5, N, unreadable]
    for x, y, bad in _eval_batches(data, split, cfg, rt, batch, max_images, workers):
        total[4] += len(bad)
        if len(y) == 0:
            continue
        x, y = normalise(x.to(rt.device), data.norm), y.to(rt.device)
        z = model(x).float()
        hit = z.topk(k5, dim=-1).indices == y[:, None]                       # (B, k)
        total[:4] += torch.stack((F.cross_entropy(z, y, reduction="sum").double(), hit[:, 0].sum().double(),
                                  hit.any(-1).sum().double(), torch.tensor(float(len(y)), device=rt.device,
                                                                            dtype=torch.float64)))
    total = training.all_reduce(total, rt, "sum")
    n = float(total[3])
    if n == 0:
        raise ValueError(f"the {split} split has no readable images to evaluate")
    out = {"loss": float(total[0]) / n, "top1": 100 * float(total[1]) / n}
    if cfg["n_classes"] > 5:
        out["top5"] = 100 * float(total[2]) / n
    if total[4] > 0:
        out["unreadable"] = float(total[4])
    return out


def regime_report(model: ViT) -> list[dict]:
    """Every layer's (Q, K, V, O) through regimes.analyse_layer: inertia (positive, negative, zero)
    of the layer's W_sym = sym(Σₕ Wₕ) and A_sym (A = W (Mᵀ)⁻¹, M = V O), and its regime.  The
    λ-term is not part of W here: its per-layer mean is listed beside it."""
    rows = []
    for i, block in enumerate(model.blocks):
        m = block.attn.interaction()
        r = regimes.analyse_layer(m["Q"], m["K"], m["V"], m["O"], n_heads=m["n_heads"], scale=m["scale"])
        lam = m.get("lam")
        rows.append({"layer": i, "regime": r["regime"], "inertia_W_sym": "/".join(map(str, r["inertia_W"])),
                     "inertia_A_sym": "/".join(map(str, r["inertia_A"])) if r.get("inertia_A") else "",
                     "cond_M": r["cond_M"], "lam_mean": float(lam.mean()) if lam is not None else 0.0})
    return rows


# ==============================================================================================
# 6. Command line
# ==============================================================================================
def build_parser() -> training.ArgParser:
    p = training.ArgParser(description="Train a vision transformer built from ode_attention.Block "
                           "(see the module docstring for the maths, data and outputs).")
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), default="small",
      help="settings: small (CPU, shapes, default), cifar10, deit-tiny or deit-small (224 px, notes §4.2)")
    a("--data", help="shapes (embedded), cifar10 (downloaded), a CIFAR-10 .tar.gz, or an ImageNet-style "
                     "folder with train/<class>/ and val/<class>/ (preset's default)")
    a("--pe", choices=PES, help="positional encoding (preset: small rope-axial, deit learned)")
    a("--pool", choices=POOLS, help="class token (cls) or mean of the patch tokens (preset's default)")
    training.add_attention_args(a)
    for name, typ, h in (("d-model", int, "width d"), ("n-layers", int, "blocks L"),
                         ("n-heads", int, "heads H"), ("mlp-ratio", float, "MLP width / d"),
                         ("image-size", int, "input pixels (square)"), ("patch-size", int, "patch pixels p"),
                         ("batch-size", int, "GLOBAL images per optimiser step (all processes and micro-batches)"),
                         ("grad-accum", int, "micro-batches per optimiser step"),
                         ("steps", int, "optimiser steps (overrides --epochs)"),
                         ("epochs", float, "passes over the training split (when --steps is not set)"),
                         ("lr", float, "peak learning rate"), ("min-lr", float, "final learning rate of the cosine"),
                         ("warmup", int, "linear warmup steps (overrides --warmup-epochs)"),
                         ("warmup-epochs", float, "linear warmup in epochs"), ("beta2", float, "Adam β₂"),
                         ("weight-decay", float, "AdamW decay on weight matrices"),
                         ("clip", float, "gradient-norm clip (0 = off)"), ("dropout", float, "dropout"),
                         ("drop-path", float, "stochastic depth of the last block"),
                         ("label-smoothing", float, "ε of the smoothed targets"),
                         ("mixup", float, "mixup Beta(α, α) parameter (0 = off)"),
                         ("cutmix", float, "cutmix Beta(α, α) parameter (0 = off)"),
                         ("crop-min-scale", float, "random-resized-crop: smallest area fraction (1 = no crop)"),
                         ("hflip", float, "probability of a horizontal flip"),
                         ("eval-every", int, "evaluate every N steps (default: the preset's, or once per epoch)"),
                         ("eval-images", int, "validation images in the periodic evaluations (0 = the "
                                              "whole split; the final one always uses it all)")):
        a(f"--{name}", type=typ, help=f"{h} (preset's default)")
    a("--rope-base", type=float, default=100.0, help="base of the rope-axial frequency ladder (Heo et al.: 100)")
    a("--workers", type=int, default=None, help="DataLoader workers for image folders (default min(8, CPUs))")
    training.add_run_args(a, default_out="runs/vit-<data>-<pe>-lam<λ>-<mode>-<regime>-<time>",
                          cache_help="where downloads are cached", probe_help="validation images in the token probe")
    a("--bench", action="store_true", help="measure images/s of every PE, λ mode and regime against "
      "the plain model (learned PE, --lam 0), on synthetic images")
    a("--bench-variants", help="comma-separated subset for --bench (plain is always first): plain, none, "
      "sin2d, rope-axial, rope-mixed, lam-identity, lam-softplus, divergent, intermediate, convergent")
    a("--compare", metavar="PES", help="train one run per PE in this comma-separated list and seed, "
      "as separate processes, and write compare.csv / .md / .png to --out")
    a("--seeds", type=int, default=3, help="seeds 0 … N−1 per PE in --compare")
    a("--jobs", type=int, default=2, help="processes at once in --compare (each with 1 thread)")
    a("--runs-dir", help="where --compare keeps its run folders (default runs/compare-<name of --out>); "
      "finished runs found there are reused")
    return p


def resolve_config(args) -> dict:
    """Preset values, overridden by the flags that were given; validated.  (Epoch-based settings
    are turned into steps by `schedule`, once the dataset size is known.)"""
    cfg = dict(PRESETS[args.preset])
    for k in list(cfg):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if args.steps is not None:
        cfg["epochs"] = None
    if args.warmup is not None:
        cfg["warmup_epochs"] = None
    cfg.update(preset=args.preset, lam=float(args.lam), lam_mode=args.lam_mode, regime=args.regime,
               seed=args.seed, rope_base=float(args.rope_base), model="vit", causal=False, qkv_bias=True)
    if cfg["data"] is None:
        raise ValueError(f"the {args.preset} preset trains on ImageNet: pass --data with a folder that "
                         f"holds train/<class>/*.JPEG and val/<class>/*.JPEG")
    for k in ("d_model", "n_layers", "n_heads", "image_size", "patch_size", "batch_size", "grad_accum"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {cfg[k]}")
    if cfg["steps"] is not None and cfg["steps"] < 1 or cfg["epochs"] is not None and not cfg["epochs"] > 0:
        raise ValueError("--steps must be at least 1 and --epochs positive")
    for k in ("warmup", "warmup_epochs", "eval_every", "eval_images"):
        if cfg[k] is not None and cfg[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be 0 or more, got {cfg[k]}")
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(f"--image-size {cfg['image_size']} is not a multiple of --patch-size {cfg['patch_size']}")
    if cfg["d_model"] % cfg["n_heads"]:
        raise ValueError(f"--d-model {cfg['d_model']} is not divisible by --n-heads {cfg['n_heads']}")
    if not cfg["mlp_ratio"] > 0:
        raise ValueError(f"--mlp-ratio must be positive, got {cfg['mlp_ratio']}")
    if not (cfg["lr"] > 0 and 0 <= cfg["min_lr"] <= cfg["lr"]):
        raise ValueError(f"need --lr > 0 and 0 ≤ --min-lr ≤ --lr, got {cfg['lr']} and {cfg['min_lr']}")
    if not 0 <= cfg["dropout"] < 1 or not 0 <= cfg["drop_path"] < 1 or not 0 < cfg["beta2"] < 1 \
            or cfg["clip"] < 0 or cfg["weight_decay"] < 0:
        raise ValueError("need 0 ≤ --dropout < 1, 0 ≤ --drop-path < 1, 0 < --beta2 < 1, --clip ≥ 0 "
                         "and --weight-decay ≥ 0")
    if not 0 <= cfg["label_smoothing"] < 1 or cfg["mixup"] < 0 or cfg["cutmix"] < 0 \
            or not 0 < cfg["crop_min_scale"] or not 0 <= cfg["hflip"] <= 1:
        raise ValueError("need 0 ≤ --label-smoothing < 1, --mixup ≥ 0, --cutmix ≥ 0, "
                         "--crop-min-scale > 0 and 0 ≤ --hflip ≤ 1")
    if not (math.isfinite(cfg["lam"]) and math.isfinite(cfg["rope_base"]) and cfg["rope_base"] > 0):
        raise ValueError(f"--lam must be finite and --rope-base positive, got {cfg['lam']} and {cfg['rope_base']}")
    if cfg["lam_mode"] == "softplus-diag" and cfg["lam"] < 0:
        raise ValueError(f"--lam-mode softplus-diag keeps λ positive, so --lam must be ≥ 0 (got {cfg['lam']}); "
                         f"use --lam-mode identity for a negative λ")
    return cfg


def schedule(cfg: dict, n_train: int) -> None:
    """Epoch-based settings → steps: steps = ⌈epochs · N / B⌉, warmup likewise, evaluation once per
    epoch when not given."""
    per_epoch = max(1, math.ceil(n_train / cfg["batch_size"]))
    if cfg["steps"] is None:
        cfg["steps"] = max(1, math.ceil(cfg["epochs"] * per_epoch))
    if cfg["warmup"] is None:
        cfg["warmup"] = int(round(cfg["warmup_epochs"] * per_epoch))
    if cfg["eval_every"] is None:
        cfg["eval_every"] = per_epoch
    cfg["steps_per_epoch"] = per_epoch


def default_run_name(cfg: dict) -> str:
    data = cfg["data"] if cfg["data"] in ("shapes", "cifar10") else Path(cfg["data"]).name.split(".")[0]
    lam = f"lam{cfg['lam']:g}-{cfg['lam_mode']}" if cfg["lam"] else "lam0"
    return f"vit-{data}-{cfg['pe']}-{lam}-{cfg['regime']}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.bench:
        return bench(args)
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:])
    cfg = resolve_config(args)
    rt = training.setup_runtime(args.device, amp=not args.no_amp)
    try:
        return train(cfg, args, rt)
    finally:
        training.teardown(rt)


def train(cfg: dict, args, rt: training.Runtime) -> int:
    training.seed_everything(cfg["seed"])
    micro = training.split_batch(cfg["batch_size"], rt, cfg["grad_accum"])
    data = load_data(cfg["data"], Path(args.cache_dir))
    folder = isinstance(data, FolderData)
    workers = (args.workers if args.workers is not None else min(8, os.cpu_count() or 1)) if folder else 0
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    schedule(cfg, data.n_train)
    cfg.update(n_classes=len(data.classes), classes=data.classes,
               attn_pe=cfg["pe"] if cfg["pe"] in ("rope-axial", "rope-mixed") else "none",
               seq_len=(cfg["image_size"] // cfg["patch_size"]) ** 2 + (cfg["pool"] == "cls"))
    model = training.build_on(build_vit, cfg, rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)

    run, start = training.open_run(resume=args.resume, out=args.out or HERE / "runs" / default_run_name(cfg),
                                   config=cfg, model=model, optimizer=optimizer, resume_keys=RESUME_KEYS, rt=rt)

    n_params = sum(p.numel() for p in model.parameters())
    title = (f"{data.name} pe={cfg['pe']} λ={cfg['lam']:g} ({cfg['lam_mode']}) regime={cfg['regime']} "
             f"{cfg['n_layers']}×{cfg['d_model']}")
    if rt.is_main:
        print(f"{data.name}: {data.n_train:,} train / {data.n_val:,} val images, {len(data.classes)} classes;  "
              f"model {n_params / 1e6:.2f}M parameters on {rt.device}"
              f"{' × ' + str(rt.world_size) if rt.distributed else ''};  {cfg['steps']} steps "
              f"({cfg['steps'] / cfg['steps_per_epoch']:.1f} epochs);  run folder {run.path}", flush=True)

    batches = Batches(data, cfg, rt, micro, workers=workers)
    eval_batch = max(1, min(512, 2 * micro))

    def eval_fn(raw, final=False):  # periodic evaluations may be capped by --eval-images; the last never is
        return {"val": evaluate(raw, data, cfg, rt, batch=eval_batch,
                                max_images=0 if final else cfg["eval_images"], workers=workers)}

    def loss_fn(m, batch):
        x, t = batch
        return soft_cross_entropy(m(x), t), x.shape[0]

    t0 = time.perf_counter()
    result = training.train_loop(
        training.wrap_model(model, rt, compile=False if args.no_compile else None),
        optimizer, rt=rt, run=run, config=cfg, steps=cfg["steps"], raw_model=model,
        batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, lr=cfg["lr"], warmup=cfg["warmup"],
        min_lr=cfg["min_lr"], grad_accum=cfg["grad_accum"], clip=cfg["clip"], eval_every=cfg["eval_every"],
        ckpt_every=args.ckpt_every or cfg["eval_every"], log_every=args.log_every, start_step=start,
        unit="img", title=title)
    wall = time.perf_counter() - t0
    if result["status"] == "interrupted":
        return training.interrupted_exit(result, run, rt)
    if rt.is_main:
        # the probe and the regime report work in float64, which MPS lacks: there, on the CPU
        dev = torch.device("cpu") if rt.device.type == "mps" else rt.device
        model.to(dev).eval()
        xs = [x for x, y, _ in _eval_batches(data, "val", cfg, training.Runtime(device=dev),
                                             max(1, args.probe_batch), args.probe_batch, 0) if len(y)]
        with training.autocast(rt):
            training.write_probe(training.token_probe(model, normalise(torch.cat(xs).to(dev), data.norm)),
                                 run, title, what="validation images")
        report = regime_report(model)
        training.write_csv(run.path / "regimes.csv", report)
        ev = result["eval"]
        summary = {"step": result["step"], "wall_s": wall, "params": n_params, "val": ev.get("val"),
                   "classes": data.classes, "unreadable_train_images": sorted(batches.unreadable),
                   "regimes": [r["regime"] for r in report],
                   "lam": [blk.attn.lam_values().tolist() if blk.attn.lam_values() is not None else None
                           for blk in model.blocks]}
        run.write_json("summary.json", summary)
        top5 = f", top-5 {ev['val']['top5']:.2f}%" if "top5" in ev["val"] else ""
        print(f"done: step {result['step']}, validation top-1 {ev['val']['top1']:.2f}%{top5}, "
              f"loss {ev['val']['loss']:.4f}; layer regimes {', '.join(summary['regimes'])}  "
              f"({wall:.0f} s; {run.path})")
    return 0


# ==============================================================================================
# 7. Benchmark: images/s of every PE, λ mode and regime against the plain model
# ==============================================================================================
BENCH_VARIANTS = {"plain": ("plain (learned, --lam 0)", {}),
                  **{pe: (f"pe {pe}", dict(pe=pe)) for pe in PES if pe != "learned"},
                  "lam-identity": ("lam identity -0.1", dict(lam=-0.1)),
                  "lam-softplus": ("lam softplus-diag 0.05", dict(lam=0.05, lam_mode="softplus-diag")),
                  **{r: (f"regime {r}", dict(regime=r)) for r in REGIMES if r != "free"}}


def bench(args) -> int:
    """One process, one run, synthetic images: every variant timed in interleaved rounds (the
    median of the rounds is kept, so a noisy neighbour on a shared machine hits all alike).

    Model FLOPs per image (PaLM / nanoGPT accounting, forward + backward), n tokens per image:
        F = n · (6 N + 12 L n d)     (N = parameters in weight matrices, class token and positions
                                      excluded; 12 L n d per token = the attention scores and mixing)
    MFU = F · images/s / peak.  DeiT-Tiny at 224 px: n = 197, N = 5.5 M, F ≈ 7.7 GFLOP per image.
    The constrained variants' K, V solves (O(d³) per layer per step) are not counted."""
    rt = training.setup_runtime(args.device, amp=not args.no_amp)
    gpu = rt.device.type == "cuda"
    # DeiT-Tiny at 224 px on a GPU; on CPU a 2-layer cut of it at 64 px
    cfg = dict(PRESETS["deit-tiny"] if gpu else PRESETS["deit-tiny"] | dict(n_layers=2, image_size=64))
    for k in ("d_model", "n_layers", "n_heads", "image_size", "patch_size", "mlp_ratio"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(n_classes=1000, rope_base=float(args.rope_base), dropout=0.0, drop_path=0.0,
               pool=args.pool or "cls")
    micro = args.batch_size or (256 if gpu else 8)
    plain = dict(pe="learned", lam=0.0, lam_mode="identity", regime="free")
    variants = training.select_variants(BENCH_VARIANTS, args.bench_variants)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(micro, 3, cfg["image_size"], cfg["image_size"], generator=gen).to(rt.device)
    t = soft_targets(torch.randint(0, 1000, (micro,), generator=gen), 1000, 0.1).to(rt.device)
    runs = []
    for name, over in variants:
        c = dict(cfg, **plain) | over
        model = build_vit(c).to(rt.device)
        step = training.bench_step(model, make_optimizer(model, c, rt.device), rt,
                                   lambda fwd: soft_cross_entropy(fwd(x), t),
                                   compile=False if args.no_compile else None)
        runs.append((name, model, step))
        if rt.is_main:
            print(f"built {name}", flush=True)
    rounds: dict = {}
    sec_per_step = training.time_variants([(n, s) for n, _, s in runs], rt, args.bench_rounds,
                                          args.bench_steps, raw=rounds)
    peak = training.peak_tflops(rt, args.peak_tflops)
    n_tok = (cfg["image_size"] // cfg["patch_size"]) ** 2 + (cfg["pool"] == "cls")
    rows, base = [], None
    for name, model, _ in runs:
        sec = sec_per_step[name]
        ips = micro / sec
        base = base or ips
        # F = n (6 N + 12 L n d) per image of n tokens
        flops = n_tok * training.flops_per_token(model, cfg["n_layers"], n_tok, cfg["d_model"],
                                                 skip=("cls", "pos.weight"))
        rows.append({"variant": name, "images_per_s": ips, "ratio_to_plain": ips / base, "step_s": sec,
                     "step_s_rounds": rounds[name],
                     "gflop_per_image": flops / 1e9, "mfu": (flops * ips / (peak * 1e12)) if peak else None})
    out = Path(args.out or HERE / "runs" / f"bench-vit-{time.strftime('%Y%m%d-%H%M%S')}")
    report = {"device": str(torch.cuda.get_device_name() if gpu else "cpu"), "threads": torch.get_num_threads(),
              "amp": str(rt.amp_dtype), "compile": gpu and not args.no_compile, "micro_batch": micro,
              "config": {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "image_size", "patch_size",
                                             "mlp_ratio", "pool")},
              "tokens_per_image": n_tok, "peak_tflops": peak, "rows": rows}
    if rt.is_main:
        training.RunDir(out).write_json("bench.json", report)
        print(f"\n{report['device']}, {cfg['n_layers']}×{cfg['d_model']} ({cfg['n_heads']} heads), "
              f"{cfg['image_size']} px / patch {cfg['patch_size']} ({n_tok} tokens), batch {micro}, "
              f"amp {report['amp']}:")
        print(f"{'variant':<28}{'images/s':>12}{'× plain':>9}{'MFU':>8}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['variant']:<28}{r['images_per_s']:>12,.1f}{r['ratio_to_plain']:>9.3f}{mfu:>8}")
        print(f"(written to {out / 'bench.json'})")
    training.teardown(rt)
    return 0


# ==============================================================================================
# 8. Comparison: top-1 of several PEs after the same budget, over seeds
# ==============================================================================================
def _strip(argv: list, flags: dict) -> list:
    """argv without the given flags (flag → number of values it takes)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in flags:
            i += 1 + (flags[name] if "=" not in a else 0)
            continue
        out.append(a)
        i += 1
    return out


def compare(args, argv: list) -> int:
    """Each (PE, seed) is its own `python train_vit.py … --pe PE --seed S` process with one thread
    (OMP_NUM_THREADS=1), at most --jobs at once, in --runs-dir; then the validation top-1 of every
    run is tabulated (mean ± std over seeds) and drawn against the step, in --out: compare.csv,
    compare.md, compare.png."""
    pes = [p.strip() for p in args.compare.split(",") if p.strip()]
    for pe in pes:
        if pe not in PES:
            raise ValueError(f"unknown PE {pe!r} in --compare: choose from {', '.join(PES)}")
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be at least 1")
    out = Path(args.out or HERE / "runs" / f"compare-vit-{time.strftime('%Y%m%d-%H%M%S')}")
    runs_dir = Path(args.runs_dir or HERE / "runs" / f"compare-{out.name}")
    base = _strip(list(argv), {"--compare": 1, "--seeds": 1, "--jobs": 1, "--out": 1, "--pe": 1, "--seed": 1,
                               "--runs-dir": 1})
    jobs = [(pe, s) for s in range(args.seeds) for pe in pes]
    todo = []
    for pe, s in jobs:
        rdir = runs_dir / f"{pe}-seed{s}"
        if (rdir / "summary.json").exists():        # done in an earlier call: keep it
            continue
        todo.append(([sys.executable, str(Path(__file__).resolve()), *base, "--pe", pe, "--seed", str(s),
                      "--out", str(rdir)] + (["--resume", str(rdir)] if (rdir / "ckpt.pt").exists() else []),
                     rdir / "stdout.txt"))
    failed = training.run_processes(todo, args.jobs, desc="compare runs")
    if failed:
        raise ValueError(f"{len(failed)} comparison run(s) failed: {failed[0]}")
    rows, curves = [], {}
    for pe, s in jobs:
        rdir = runs_dir / f"{pe}-seed{s}"
        summ = json.loads((rdir / "summary.json").read_text())
        cfg = json.loads((rdir / "config.json").read_text())
        rows.append({"pe": pe, "seed": s, "steps": summ["step"], "top1": summ["val"]["top1"],
                     "val_loss": summ["val"]["loss"], "wall_s": round(summ["wall_s"], 1),
                     "params": summ["params"], "data": cfg["data"]})
        curves[(pe, s)] = [(r["step"], r["value"]) for r in training.RunDir(rdir).read()
                           if r["split"] == "val" and r["metric"] == "top1"]
    training.write_csv(out / "compare.csv", rows)
    cfg0 = json.loads((runs_dir / f"{pes[0]}-seed0" / "config.json").read_text())
    lines = ["| --pe | top-1 (%) mean ± std | top-1 per seed | first evaluation ≥ 95% (step, per seed) "
             "| wall s / run | parameters |", "|---|---|---|---|---|---|"]
    for pe in pes:
        v = np.array([r["top1"] for r in rows if r["pe"] == pe])
        w = np.mean([r["wall_s"] for r in rows if r["pe"] == pe])
        n_p = next(r["params"] for r in rows if r["pe"] == pe)
        # learning speed: the first periodic evaluation that reaches 95% ("–": none did)
        hit = [next((str(st) for st, v95 in curves[(pe, s)] if v95 >= 95.0), "–") for s in range(args.seeds)]
        lines.append(f"| {pe} | {v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in v)} | {', '.join(hit)} | {w:.0f} | {n_p:,} |")
    chance = 100.0 / cfg0["n_classes"]
    md = "\n".join(lines) + (f"\n\n{cfg0['data']}, {cfg0['steps']} steps of batch {cfg0['batch_size']}, "
                             f"{cfg0['n_layers']} × {cfg0['d_model']} ({cfg0['n_heads']} heads), "
                             f"patch {cfg0['patch_size']} of {cfg0['image_size']} px, pool {cfg0['pool']}; "
                             f"final top-1 over the whole validation split, periodic evaluations every "
                             f"{cfg0['eval_every']} steps on {cfg0['eval_images'] or 'all'} images; chance "
                             f"{chance:.0f}%.  Wall-clock: one thread per run, {args.jobs} runs at once "
                             f"(indicative only on a shared machine).\n")
    training.atomic_write(out / "compare.md", lambda tmp: tmp.write_text(md))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, pe in enumerate(pes):
        col = f"C{i}"
        for s in range(args.seeds):
            pts = curves[(pe, s)]
            if pts:
                ax[0].plot(*zip(*pts), "o-", color=col, ms=3, alpha=0.8, label=pe if s == 0 else None)
        v = [r["top1"] for r in rows if r["pe"] == pe]
        ax[1].bar(i, np.mean(v), color=col, alpha=0.6)
        ax[1].plot([i] * len(v), v, "k.", ms=6)
    for a in ax:
        a.axhline(chance, color="gray", ls=":", lw=1)
        a.grid(alpha=0.3)
    ax[0].set(xlabel="optimiser step", ylabel="validation top-1 (%)", title="every seed")
    ax[0].legend(fontsize=8)
    ax[1].set_xticks(range(len(pes)), pes)
    ax[1].set(ylabel="final validation top-1 (%)", title=f"mean and seeds (dotted: chance {chance:.0f}%)")
    fig.suptitle(f"{cfg0['data']}: --pe after {cfg0['steps']} steps", fontsize=10)
    fig.tight_layout()
    training.atomic_write(out / "compare.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    print(md)
    print(f"(written to {out}/compare.csv, compare.md, compare.png)")
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
