"""data/images.py -- the image data of train_vit.py: the embedded shapes task, CIFAR-10, ImageNet-style
folders; random-resized-crop, flip, normalisation, mixup / cutmix, label smoothing; and batches
that are a pure function of (seed, step).

Datasets (train_vit.py --data)
------------------------------
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
shapes-hard (embedded; `train_vit.py --preset hard`)  48 × 48 images (20,000 / 2,000), a 6 × 6 grid:
    A and B as above, the label the relation of B seen from A in 8 compass directions × near / far
    (Chebyshev distance ≤ 2 or > 2): 16 classes, drawn uniformly; 0-4 decoys (hollow squares,
    crosses like B, bars like A, A without its centre pixel, B with an arm cut short), Gaussian
    pixel noise (std 48). The same independence of content
    and place holds, so chance (6.25%) is the ceiling without positions. Made so that the PEs do
    not all saturate (issue #14); its budget is not yet tuned.
cifar10  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a,
    published on the CIFAR page), its python pickle batches read with a numpy-only unpickler:
    50,000 train / 10,000 test images (the test batch is the "val" split here, as is customary).
    A local copy of the archive can be passed as --data PATH.tar.gz.
PATH     the extracted archive: PATH = cifar-10-batches-py/ (data_batch_1..5, test_batch,
    batches.meta), or the folder holding it (torchvision's root=; one holding only the downloaded
    cifar-10-python.tar.gz reads that).  The same pickles, read by the same restricted unpickler:
    exactly the arrays and classes of the .tar.gz.
PATH     an ImageNet-style folder: PATH/train/<class>/*.JPEG and PATH/val/<class>/*.JPEG (any of
    .jpeg .jpg .png .bmp .webp .ppm .tif .gif), classes = the train/ folder names sorted,
    decoded with Pillow in DataLoader workers (--workers).  A missing folder or an empty class is
    an error before training starts; an unreadable image is skipped, counted and named (once on
    the console, and in summary.json): in training the next file of the list takes its place in
    the batch, in evaluation it is left out (metrics.csv counts it as "unreadable").
    validation/ is read as a synonym of val/ (val/ wins if both exist).
    A FLAT val/ (the images directly in it, as ImageNet and Kaggle ship it) is labelled by a file:
    Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the class is the first token, a
    WordNet id = a train/ folder name), found in PATH, PATH/val or up to 3 folders above PATH
    (Kaggle's PATH is <download>/ILSVRC/Data/CLS-LOC); else val_labels.txt / val_labels.csv in
    PATH or PATH/val, one `file,class` per line (comma, tab or space; path and extension of the
    file optional).  Without one: an error naming the file expected, and
    `python -m data.images --sort-val PATH [--labels FILE]` moves the images into val/<class>/
    (each file by a hard link + unlink, refusing an existing target; nothing moves if any is).

Transforms (section 2, written once): random-resized-crop (Inception / torchvision: area fraction
s ~ U(scale), log aspect ~ U(log ratio), 10 tries, else the centre crop), horizontal flip,
normalisation, mixup / cutmix (timm's batch mode) and label smoothing.  DeiT's recipe also uses
RandAugment, random erasing, repeated augmentation and a model EMA: not implemented here.

Batches are a pure function of (seed, step): global sample slot g = step·B + j goes to epoch
⌊g / N⌋ and position g mod N of that epoch's permutation, and every random crop / flip / mix is
drawn from a generator seeded by its slot, so `--resume` and any number of DataLoader workers or
processes give the same batches (and, on CPU, the same losses bit for bit; tested).
"""
from __future__ import annotations

import functools
import io
import math
import os
import pickle
import signal
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import training
from data import download as data_download

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")
# per-channel mean / std of pixels in [0, 1]
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SHAPES_NORM = ((0.11, 0.11, 0.11), (0.15, 0.15, 0.15))   # measured on the generated train split
EVAL_CROP = 0.875                                          # resize to S / 0.875, centre-crop S (DeiT)


# ==============================================================================================
# 1. Datasets
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


# -- the harder embedded dataset (issue #14: a task where position matters and nothing saturates) --
# Where B lies seen from A, in 8 compass directions × near / far: 16 classes. Direction k of
# (dr, dc) = (row_B − row_A, col_B − col_A), rows counted downwards: the 45° sector of the angle
# atan2(−dr, dc) (0 = east, 1 = north-east, … counter-clockwise); no integer (dr, dc) lies on a
# sector boundary (tan 22.5° is irrational). Far: Chebyshev distance max(|dr|, |dc|) > 2.
HARD_DIRECTIONS = ["E", "NE", "N", "NW", "W", "SW", "S", "SE"]
HARD_CLASSES = [f"{d}-{r}" for d in HARD_DIRECTIONS for r in ("near", "far")]
HARD_SIZES = dict(train=20000, val=2000)
_SPRITES_HARD = dict(_SPRITES, cross=np.eye(_S, dtype=bool) | np.eye(_S, dtype=bool)[::-1],   # decoy of B
                     bar=np.pad(np.ones((_S, _S - 2), bool), ((0, 0), (1, 1))),              # decoy of A
                     # near twins: A without its centre pixel, B with one arm cut short
                     holed=np.ones((_S, _S), bool) & ~(_MID[:, None] & _MID[None, :]),
                     short=(_MID[:, None] | _MID[None, :]) & ~((np.arange(_S) == 0)[:, None] & _MID[None, :]))
HARD_DECOYS = ("ring", "cross", "bar", "holed", "short")
HARD_DEFAULTS = dict(grid=6, cell=8, distractors=4, noise=48.0)   # the data set's settings (shapes_hard_data)


def hard_label(ra, ca, rb, cb) -> np.ndarray:
    """2·direction + far of B seen from A (arrays of cell rows / columns; see HARD_CLASSES)."""
    dr, dc = np.asarray(rb) - np.asarray(ra), np.asarray(cb) - np.asarray(ca)
    direction = np.round(np.arctan2(-dr, dc) / (np.pi / 4)).astype(np.int64) % 8
    far = (np.maximum(np.abs(dr), np.abs(dc)) > 2).astype(np.int64)
    return 2 * direction + far


def make_shapes_hard(n: int, seed: int, *, grid: int = 6, cell: int = 8, distractors: int = 4,
                     noise: float = 48.0) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 (n, 3, grid·cell, grid·cell)) and labels (int64 (n,)) of shapes-hard.

    A (filled square) and B (plus sign) in two distinct cells, the label hard_label(A, B), drawn
    uniformly over the 16 classes and then uniformly over the cell pairs of that class; 0 to
    `distractors` decoys in other cells (hollow squares, crosses like B, bars like A, and near
    twins: A without its centre pixel, B with one arm cut short); random
    bright colours and offsets; dark background noise, then Gaussian pixel noise of std `noise`.
    As in make_shapes, every sprite's pixels are drawn independently of its cell, so the multiset
    of patches carries no label information: a model blind to positions stays at chance (1/16)."""
    if grid < 4 or cell < _S:
        raise ValueError(f"shapes-hard needs grid ≥ 4 and cells of at least {_S} pixels")
    rng = np.random.default_rng([seed, 54321])
    cells = np.arange(grid * grid)
    a_all, b_all = np.meshgrid(cells, cells, indexing="ij")
    a_all, b_all = a_all[a_all != b_all], b_all[a_all != b_all]
    lab_all = hard_label(a_all // grid, a_all % grid, b_all // grid, b_all % grid)
    pairs = [np.flatnonzero(lab_all == k) for k in range(len(HARD_CLASSES))]
    if any(len(q) == 0 for q in pairs):
        raise ValueError(f"a {grid} × {grid} grid cannot hold every one of the 16 relations")
    label = rng.integers(0, len(HARD_CLASSES), size=n)
    pick = np.array([pairs[k][i] for k, i in zip(label, rng.integers(0, 1 << 30, size=n) % np.array(
        [len(pairs[k]) for k in label]))])
    cell_a, cell_b = a_all[pick], b_all[pick]
    size = grid * cell
    img = rng.integers(0, 41, size=(n, size, size, 3)).astype(np.float32)
    score = rng.random((n, grid * grid))
    score[np.arange(n), cell_a] = score[np.arange(n), cell_b] = 2.0           # never a decoy's cell
    free = np.argsort(score, axis=1)[:, :distractors]
    n_dis = rng.integers(0, distractors + 1, size=n)
    kinds = rng.integers(0, len(HARD_DECOYS), size=(n, distractors))          # which decoy
    objects = [("square", cell_a, np.ones(n, bool)), ("plus", cell_b, np.ones(n, bool))]
    for j in range(distractors):
        for k, kind in enumerate(HARD_DECOYS):
            objects.append((kind, free[:, j], (n_dis > j) & (kinds[:, j] == k)))
    ii = np.arange(n)[:, None, None]
    dy, dx = np.arange(_S)[None, :, None], np.arange(_S)[None, None, :]
    for kind, where, present in objects:
        y0 = (where // grid) * cell + rng.integers(0, cell - _S + 1, size=n)
        x0 = (where % grid) * cell + rng.integers(0, cell - _S + 1, size=n)
        colour = rng.integers(110, 256, size=(n, 3)).astype(np.float32)
        yy, xx = y0[:, None, None] + dy, x0[:, None, None] + dx
        paint = _SPRITES_HARD[kind][None] & present[:, None, None]
        img[ii, yy, xx] = np.where(paint[..., None], colour[:, None, None, :], img[ii, yy, xx])
    img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    img = img.astype(np.uint8)
    return np.ascontiguousarray(img.transpose(0, 3, 1, 2)), label.astype(np.int64)


@functools.lru_cache(maxsize=2)
def shapes_hard_data() -> ArrayData:
    tx, ty = make_shapes_hard(HARD_SIZES["train"], SHAPES_SEEDS["train"], **HARD_DEFAULTS)
    vx, vy = make_shapes_hard(HARD_SIZES["val"], SHAPES_SEEDS["val"], **HARD_DEFAULTS)
    mean = tuple(float(v) for v in tx[:2000].mean(axis=(0, 2, 3)) / 255)
    std = tuple(float(v) for v in tx[:2000].std(axis=(0, 2, 3)) / 255)
    return ArrayData("shapes-hard", tx, ty, vx, vy, list(HARD_CLASSES), (mean, std))


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


CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_batch(raw: bytes, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: 'data' (N, 3072) uint8 = 1024 red, 1024 green, 1024 blue values per image, each
    plane row-major 32 × 32; 'labels' N integers in 0..9."""
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


def _cifar_from(read, path: Path) -> ArrayData:
    """data_batch_1..5 → train, test_batch → val, batches.meta's label_names → classes, whatever
    holds them: read(name) gives the bytes of cifar-10-batches-py/<name> (KeyError: not there)."""
    parts = [_cifar_batch(read(name), name, path) for name in CIFAR_BATCHES]
    classes = [f"class{i}" for i in range(10)]
    try:  # the class names, if the meta file is there
        meta = _NumpyOnlyUnpickler(io.BytesIO(read("batches.meta")), encoding="latin1").load()
        classes = [str(c) for c in meta["label_names"]][:10] or classes
    except (KeyError, ValueError, pickle.UnpicklingError, EOFError, TypeError, tarfile.TarError, OSError):
        pass
    tx = np.concatenate([p[0] for p in parts[:5]])
    ty = np.concatenate([p[1] for p in parts[:5]])
    vx, vy = parts[5]
    return ArrayData("cifar10", tx, ty, vx, vy, classes, CIFAR_NORM)


def load_cifar10(path: Path) -> ArrayData:
    """The CIFAR-10 python archive: its members cifar-10-batches-py/*."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path} is not a readable .tar.gz archive ({e}): it is corrupt or truncated") from None

    def read(name: str) -> bytes:
        member = f"{CIFAR_DIR}/{name}"
        try:
            return tar.extractfile(tar.getmember(member)).read()
        except KeyError:
            if name == "batches.meta":
                raise
            raise ValueError(f"{path} has no {member}: it is not the CIFAR-10 python archive") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{path} is corrupt or truncated: reading {member} failed ({e})") from None
    with tar:
        return _cifar_from(read, path)


def cifar_folder(path: Path) -> Path | None:
    """The extracted batches folder, if `path` is one (it holds data_batch_1 or is named
    cifar-10-batches-py) or holds one (torchvision's root=, where it extracts the archive)."""
    if (path / "data_batch_1").is_file() or path.name == CIFAR_DIR:
        return path
    if (path / CIFAR_DIR).is_dir():
        return path / CIFAR_DIR
    return None


def load_cifar10_folder(folder: Path) -> ArrayData:
    """The extracted archive: the same pickles as plain files, read by the same restricted
    unpickler, so it gives exactly the arrays and classes the .tar.gz gives."""
    def read(name: str) -> bytes:
        try:
            return (folder / name).read_bytes()
        except FileNotFoundError:
            if name == "batches.meta":
                raise KeyError(name) from None
            raise ValueError(f"{folder} has no {name}: an extracted CIFAR-10 folder holds "
                             f"{', '.join(CIFAR_BATCHES)} and batches.meta") from None
    return _cifar_from(read, folder)


# -- ImageNet-style folders ---------------------------------------------------------------------
def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading an image folder needs Pillow, which is not installed: "
                         "pip install pillow (matplotlib, in requirements.txt, normally installs it)") from None
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
                         f"train/<class>/*.JPEG and val/<class>/*.JPEG (or validation/<class>/, or a "
                         f"flat val/ with {KAGGLE_VAL} or {VAL_LABELS[0]})")
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


VAL_DIRS = ("val", "validation")                  # validation/ is the synonym some mirrors use
KAGGLE_VAL = "LOC_val_solution.csv"                # Kaggle's ImageNet Object Localization Challenge
VAL_LABELS = ("val_labels.txt", "val_labels.csv")  # two columns: file name, class name
_SORT_HINT = "python -m data.images --sort-val PATH --labels FILE"


def _val_dir(root: Path) -> Path:
    """val/, else validation/ (the name is only a synonym: the contents are read the same way)."""
    for name in VAL_DIRS:
        if (root / name).is_dir():
            return root / name
    return root / "val"


def _flat_images(split_dir: Path) -> list:
    return sorted(e.path for e in os.scandir(split_dir) if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))


def find_val_labels(root: Path, val_dir: Path) -> Path | None:
    """The label file of a flat val/: LOC_val_solution.csv in PATH, PATH/val or the ancestors of
    PATH up to Kaggle's download root (PATH = <root>/ILSVRC/Data/CLS-LOC there), else
    val_labels.txt / .csv in PATH or PATH/val (the nearest first)."""
    for place in (root, val_dir):
        for name in (KAGGLE_VAL,) + VAL_LABELS:
            if (place / name).is_file():
                return place / name
    for place in list(root.resolve().parents)[:3]:
        if (place / KAGGLE_VAL).is_file():
            return place / KAGGLE_VAL
    return None


def read_val_labels(path: Path) -> dict:
    """{image stem: class name} from a label file.
    LOC_val_solution.csv: header `ImageId,PredictionString`, rows `ILSVRC2012_val_00008726,n02119789
        255 142 454 329 n02119789 44 21 322 295` -- the class is the first token (a WordNet id, the
        name of the train/ folder), the rest are boxes.
    val_labels.txt / .csv: `file,class` per line, split at a comma, a tab or spaces; the file may
        carry a path and an extension (only its stem is matched); a first line whose second field
        is `label` / `class` / `classname` / `class_name` / `synset` / `wnid` is a header."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file of (file, class) rows") from None
    kaggle = path.name == KAGGLE_VAL
    out = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if kaggle:
            first, _, rest = line.partition(",")
            fields = [first.strip()] + rest.split()[:1]
        else:
            fields = [f.strip() for f in (line.split(",") if "," in line else line.split("\t") if "\t" in line
                                          else line.split(None, 1))]
        if i == 0 and (kaggle and fields[0] == "ImageId" or not kaggle and len(fields) >= 2 and
                       fields[1].lower() in ("label", "class", "classname", "class_name", "synset", "wnid")):
            continue                                     # the header
        if len(fields) < 2 or not fields[0] or not fields[1]:
            what = "ImageId,PredictionString (its first token the class)" if kaggle else "file,class"
            raise ValueError(f"{path} line {i + 1} is not `{what}`: {line.strip()[:60]!r}")
        stem = Path(fields[0].replace("\\", "/")).name
        stem = stem.rsplit(".", 1)[0] if stem.lower().endswith(IMAGE_EXTS) else stem
        out[stem] = fields[1]
    if not out:
        raise ValueError(f"{path} holds no (file, class) rows")
    return out


def _stem(file: str) -> str:
    return Path(file).name.rsplit(".", 1)[0]


def _flat_split(val_dir: Path, root: Path, classes: list) -> list:
    """A flat val/ (every image directly in it, as ImageNet's and Kaggle's validation sets come):
    labels from its label file, items sorted by (class, file) like a sorted val/<class>/ tree."""
    files = _flat_images(val_dir)
    labels_path = find_val_labels(root, val_dir)
    if labels_path is None:
        raise ValueError(f"{val_dir} holds {len(files)} images but no class folders and no label file: put "
                         f"Kaggle's {KAGGLE_VAL} or a {VAL_LABELS[0]} of `file,class` lines in {root} or "
                         f"{val_dir}, or sort the images into {val_dir}/<class>/ ({_SORT_HINT})")
    labels = read_val_labels(labels_path)
    index = {c: k for k, c in enumerate(classes)}
    items = []
    for f in files:
        c = labels.get(_stem(f))
        if c is None:
            raise ValueError(f"{labels_path} gives no class for {f}: it is not the label file of this val/ folder")
        if c not in index:
            raise ValueError(f"{labels_path} gives {Path(f).name} the class {c!r}, which has no folder in "
                             f"{root / 'train'}")
        items.append((f, index[c]))
    return sorted(items, key=lambda it: (it[1], it[0]))


def scan_folder(root: Path) -> FolderData:
    """ImageNet layout: classes are the sub-folders of train/, sorted by name; the validation split
    is val/<class>/ (or validation/<class>/), or a flat val/ with a label file."""
    _pillow()
    if not (root / "train").is_dir() and not any((root / v).is_dir() for v in VAL_DIRS):
        raise ValueError(f"{root / 'train'} is missing: --data takes an ImageNet-style folder "
                         f"(train/<class>/*.JPEG and val/<class>/*.JPEG) or an extracted CIFAR-10 folder "
                         f"({CIFAR_DIR}/ with data_batch_1..5 and test_batch)")
    train, classes = _scan_split(root / "train", None)
    val_dir = _val_dir(root)
    if val_dir.is_dir() and not any(e.is_dir() for e in os.scandir(val_dir)) and _flat_images(val_dir):
        val = _flat_split(val_dir, root, classes)
    else:
        val, _ = _scan_split(val_dir, classes)
    return FolderData(root.name, root, train, val, classes)


def sort_val(root: Path, labels_path: Path) -> int:
    """Move every image of a flat PATH/val (or validation) into val/<class>/ by the label file: all
    files are checked first (each has a class; no target exists), then each is moved alone, with a
    hard link (which refuses an existing target) and an unlink, so an interrupted sort leaves every
    file at its old name or its new one (a rerun finishes it).  Returns the number of files moved."""
    val_dir = _val_dir(root)
    if not val_dir.is_dir():
        raise ValueError(f"{val_dir} is missing: --sort-val takes the folder that holds val/")
    labels = read_val_labels(labels_path)
    plan = []
    for f in _flat_images(val_dir):
        c = labels.get(_stem(f))
        if c is None:
            raise ValueError(f"{labels_path} gives no class for {f}: nothing was moved")
        if c in ("", ".", "..") or "/" in c or "\\" in c:
            raise ValueError(f"{labels_path} gives {Path(f).name} the class {c!r}, which is not a folder name: "
                             f"nothing was moved")
        dst = val_dir / c / Path(f).name
        if os.path.lexists(dst) and not os.path.samefile(f, dst):
            raise ValueError(f"{dst} already exists: nothing was moved (remove it or the flat copy first)")
        plan.append((Path(f), dst))
    for src, dst in plan:
        dst.parent.mkdir(exist_ok=True)
        if os.path.lexists(dst):                   # linked by an interrupted sort: finish the move
            src.unlink()
            continue
        try:
            os.link(src, dst)                      # atomic, and fails if dst appeared meanwhile
        except FileExistsError:
            raise ValueError(f"{dst} appeared while sorting: {src} was left where it is") from None
        except OSError:                            # no hard links here (FAT, some network shares)
            if os.path.lexists(dst):
                raise ValueError(f"{dst} appeared while sorting: {src} was left where it is") from None
            os.rename(src, dst)
            continue
        src.unlink()
    return len(plan)


def load_data(data: str, cache_dir: Path):
    """--data: shapes, cifar10 (downloaded and verified into cache_dir), a CIFAR-10 archive or its
    extracted folder, or an ImageNet-style folder."""
    if data == "shapes":
        return shapes_data()
    if data == "shapes-hard":
        return shapes_hard_data()
    if data == "cifar10":
        return load_cifar10(data_download.download(CIFAR10["urls"], cache_dir / CIFAR10["file"], md5=CIFAR10["md5"]))
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {data!r} is neither a known dataset (shapes, shapes-hard, cifar10) nor an existing "
                         f"folder or archive")
    if path.is_dir():
        if (folder := cifar_folder(path)) is not None:
            return load_cifar10_folder(folder)
        if (path / CIFAR10["file"]).is_file() and not (path / "train").is_dir():
            return load_cifar10(path / CIFAR10["file"])     # torchvision's root= before extraction
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


# ==============================================================================================
# 3. Batches (a pure function of (seed, step)) and the loaders
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


def eval_batches(data, split: str, cfg: dict, rt: training.Runtime, batch: int, max_images: int,
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


# ==============================================================================================
# 4. python -m data.images --sort-val PATH --labels FILE
# ==============================================================================================
def main(argv=None) -> int:
    p = training.ArgParser(prog="python -m data.images",
                           description="Sort a flat ImageNet val/ folder into val/<class>/ by a label file.")
    p.add_argument("--sort-val", metavar="PATH", required=True, help="the folder holding train/ and a flat val/")
    p.add_argument("--labels", metavar="FILE", help=f"{KAGGLE_VAL} or a `file,class` list (default: found "
                                                   f"beside val/ as train_vit.py finds it)")
    a = p.parse_args(argv)
    root = Path(a.sort_val)
    labels = Path(a.labels) if a.labels else find_val_labels(root, _val_dir(root))
    if labels is None:
        raise ValueError(f"no label file found for {_val_dir(root)}: pass --labels FILE")
    if not labels.is_file():
        raise ValueError(f"--labels {labels} is not a file")
    n = sort_val(root, labels)
    print(f"moved {n} images into class folders under {_val_dir(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
