"""training.py -- what the training scripts (train_lm.py, train_vit.py) share.

Nothing here knows about language or images: a script hands `train_loop` a model, an optimiser,
a `batch_fn(step, micro)` that returns this process's share of a batch, and a
`loss_fn(model, batch) -> (mean loss, units)`; everything else lives here, once.

The maths the loop implements
-----------------------------
Global batch.  With W processes (DDP through `torchrun`) and k micro-batches per optimiser step
(gradient accumulation), each micro-batch holds B / (W k) examples and its loss is a mean over
them.  The loop back-propagates loss / k and DDP averages gradients over processes, so

    g = (1/W) Σ_r (1/k) Σ_m ∇ mean_loss(r, m) = ∇ (1/B) Σ_b loss_b          (equal micro-batches)

which is exactly the gradient of the global mean: 1 process with batch B and 2 processes with
B/2 each take the same step (up to float rounding), which the tests check.

Clipping (global norm):  g ← g · min(1, c / ‖g‖₂).

Schedule (linear warmup, then cosine to a floor), step s = 0, 1, ..., S-1:

    lr(s) = lr_max · (s + 1) / w                                      s < w
    lr(s) = lr_min + (lr_max − lr_min) · (1 + cos(π p)) / 2,  p = (s − w) / (S − w)   s ≥ w

Exact resume.  A checkpoint holds model, optimiser, step, every RNG state (Python, NumPy,
torch CPU and CUDA) and the run's config.  Batches are a pure function of (seed, step), so
restoring those states replays the same arithmetic: on CPU the losses after `--resume` equal the
uninterrupted run's bit for bit (the tests check it).  Checkpoints are written to a temporary
file and renamed (os.replace is atomic on POSIX), so a kill never leaves a half-written one.

Signals.  SIGTERM / SIGINT set a flag; the loop finishes the optimiser step it is in, saves a
checkpoint and returns "interrupted" (a second Ctrl-C kills at once).  Under DDP the ranks agree
on the flag with an all-reduce, so they all stop at the same step.  The last step is saved before
the final evaluation; a signal during that evaluation cuts it short (one process; under DDP right
after it), writes nothing of it and returns "interrupted": --resume then only evaluates.

Precision and speed.  On CUDA: bf16 autocast (no loss scaling needed: bf16 has fp32's exponent
range) and torch.compile.  On MPS and CPU: float32, eager.  Device order: cuda > mps > cpu.

A run folder holds config.json, versions.json, metrics.csv (long format: step, split, metric,
value), loss.png and ckpt.pt.
"""
from __future__ import annotations

import argparse
import copy
import csv
import errno
import io
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import ode_attention
import regimes


# ----------------------------------------------------------------------------------------------
# Device, precision, distributed
# ----------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Where this process runs: its device, its rank among `world_size` processes, and the
    autocast dtype (bf16 on CUDA, None = float32 elsewhere)."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    locks: list = field(default_factory=list)       # run-folder locks, released by teardown()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; 'cuda' / 'mps' / 'cpu' are checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {name!r}: choose auto, cuda, mps or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but this PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for but this machine has no usable MPS device")
    return torch.device(name)


def setup_runtime(device: str = "auto", amp: bool = True) -> Runtime:
    """One process's runtime.  Under `torchrun` (env WORLD_SIZE > 1) it joins the process group:
    NCCL with one GPU per process on CUDA, gloo on CPU."""
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        if dev.type == "mps":
            raise ValueError("DDP is not supported on MPS: run one process, or use CUDA or CPU")
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":  # TF32 tensor cores for what stays in float32 (outside autocast)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = torch.bfloat16 if (amp and dev.type == "cuda") else None
    return Runtime(device=dev, rank=rank, local_rank=local, world_size=world, amp_dtype=amp_dtype)


def teardown(rt: Runtime) -> None:
    for lock in rt.locks:                           # the run is over: its folder is free again
        lock.release()
    rt.locks.clear()
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def autocast(rt: Runtime):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if rt.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.amp_dtype)


def wrap_model(model: torch.nn.Module, rt: Runtime, *, compile: bool | None = None,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP (when distributed), then torch.compile (CUDA only unless compile=True is forced).
    Keep a reference to the raw model: checkpoints and evaluation use it."""
    out = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        out = torch.nn.parallel.DistributedDataParallel(
            out, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if compile if compile is not None else rt.device.type == "cuda":
        out = torch.compile(out)
    return out


def all_reduce(x: torch.Tensor, rt: Runtime, op: str = "sum") -> torch.Tensor:
    """Sum / max / mean of a tensor over processes (identity on one process)."""
    if not rt.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return y / rt.world_size if op == "mean" else y


def split_batch(global_batch: int, rt: Runtime, grad_accum: int) -> int:
    """Examples per micro-batch on this process: B / (W k), which must be a whole number."""
    parts = rt.world_size * grad_accum
    if global_batch < 1 or grad_accum < 1 or global_batch % parts:
        raise ValueError(f"the global batch size {global_batch} must be a positive multiple of "
                         f"processes × gradient-accumulation steps = {rt.world_size} × {grad_accum}")
    return global_batch // parts


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def cosine_lr(step: int, *, lr: float, total: int, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to min_lr at step `total`."""
    if step < warmup:
        # lr(s) = lr_max (s + 1) / w
        return lr * (step + 1) / warmup
    # p = (s − w) / (S − w), clamped to [0, 1]
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    # lr(s) = lr_min + (lr_max − lr_min) (1 + cos πp) / 2
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------------------------
# Optimiser and model
# ----------------------------------------------------------------------------------------------
def build_on(build, cfg: dict, device: torch.device) -> torch.nn.Module:
    """build(cfg) on `device`; an allocator refusing an impossible size becomes one sentence."""
    try:
        return build(cfg).to(device)
    except (RuntimeError, MemoryError) as e:
        raise ValueError(f"cannot build this model on {device}: {str(e).splitlines()[0]}") from None


def make_adamw(model: torch.nn.Module, *, lr: float, beta2: float, weight_decay: float,
               device: torch.device, no_decay=()) -> torch.optim.AdamW:
    """AdamW (β₁ = 0.9) with weight decay on weight matrices only: never on vectors (norms,
    biases), never on the λ-term or the LDL diagonal θ (ode_attention.no_decay_parameters), nor
    on the parameters in `no_decay` (e.g. train_vit's [model.cls, model.pos.weight])."""
    skip = {id(p) for p in [*ode_attention.no_decay_parameters(model), *no_decay]}
    decay, rest = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in skip else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-8, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# RNG state, checkpoints, config checks
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the loop may touch.  Stored as tensors / plain Python values so the checkpoint
    loads with torch.load(weights_only=True)."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _named(e: OSError, path) -> OSError:
    """The same fault (same errno, so the same OSError subclass) naming `path`, the file the caller
    meant to write, instead of a temporary file or no file at all (a failed write() names none)."""
    if e.errno is None:
        return OSError(f"cannot write {path}: {e}")
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def _remove(tmp: Path) -> None:
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
    except OSError:                     # the folder itself refuses: nothing was written there either
        pass


def fsync(path, *, directory: bool = False) -> None:
    """Flush a file (or a folder's entries, directory=True) to the disk. A folder on a filesystem
    that cannot fsync folders (some network and Windows filesystems) is skipped quietly: the file
    itself was flushed."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write_all(writes: dict) -> None:
    """Several files, all or none: write(tmp) for every {path: write} first, then the renames, so a
    write that fails (a full disk, a read-only folder) leaves every old file as it was and no
    temporary file behind.  A failure is an OSError naming the file it was meant for."""
    items = [(Path(path), write) for path, write in writes.items()]
    tmps = [path.with_name(f".{path.name}.tmp{os.getpid()}") for path, _ in items]
    current = None
    try:
        for (path, write), tmp in zip(items, tmps):
            current = path
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:     # an ancestor is a regular file
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
            write(tmp)
            fsync(tmp)                  # the data is on disk before the name points at it
        for (path, _), tmp in zip(items, tmps):
            current = path
            os.replace(tmp, path)
        for folder in {path.parent for path, _ in items}:
            fsync(folder, directory=True)   # ... and so is the rename (after a crash: old or new file)
    except OSError as e:
        raise _named(e, current) from None
    finally:
        for tmp in tmps:
            _remove(tmp)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then rename tmp onto path: readers see the old file or the new one,
    never half of one; a failed write (OSError naming `path`) leaves no temporary file."""
    atomic_write_all({path: write})


def check_folder(path, flag: str, *, writable: bool = True) -> None:
    """Refuse up front, in one sentence (ValueError), a folder given as `flag` that a run could not
    use: one that is not a folder or lies under a regular file, or (writable=True) whose nearest
    existing folder refuses a new file (read-only, no permission).  Creates nothing: call it
    before the run spends minutes on data and models, and before it writes anything."""
    path = Path(path)
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is not a folder" if probe == path else f"lies under {probe}, which is not a folder"
        raise ValueError(f"{flag} {path} {where}: choose another {flag}")
    if writable:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".write-check-", dir=probe)
        except OSError as e:
            raise ValueError(f"{flag} {path} cannot be written: {probe} refuses new files "
                             f"({e.strerror or e}); choose another {flag}") from None
        os.close(fd)
        os.unlink(tmp)


class FolderLock:
    """An exclusive lock on a folder, held for the life of this object (or of the process).

    fcntl.flock on DIR/<name>: taking it is one atomic system call (no check-then-write window), and
    the kernel releases it when the holder exits in any way — kill -9 included — so a stale lock
    can never block a later run. The holder's pid is written into the file for the refusal message.
    Where fcntl is missing (Windows), O_CREAT | O_EXCL on the file is the atomic step and a file
    whose pid is not alive counts as stale."""

    def __init__(self, folder, name: str, what: str):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self._fd = None
        try:
            import fcntl
        except ImportError:                                      # pragma: no cover (Windows)
            fcntl = None
        if fcntl is None:                                        # pragma: no cover
            self._take_exclusive(what)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{folder} is in use by {what} (pid {holder}); wait for it to finish "
                             "or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def _take_exclusive(self, what: str) -> None:               # pragma: no cover (Windows)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip())
                    os.kill(pid, 0)
                except (ValueError, OSError):
                    self.path.unlink(missing_ok=True)            # stale: its holder is gone
                    continue
                raise ValueError(f"{self.path.parent} is in use by {what} (pid {pid}); wait for it to "
                                 "finish or choose another folder") from None
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            self._fd = -1
            return
        raise ValueError(f"could not take the lock {self.path}")

    def __del__(self):
        self.release()

    def release(self) -> None:
        if getattr(self, "_fd", None) is None:
            return
        if self._fd >= 0:
            os.close(self._fd)                                   # drops the flock
        else:                                                    # pragma: no cover (Windows)
            self.path.unlink(missing_ok=True)
        self._fd = None


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: the GPU's total, or this machine's RAM (0: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(need: int, device: torch.device, what: str,
                 hint: str = "lower the batch size, sequence length or width") -> None:
    """Refuse up front a run whose LOWER BOUND of memory `need` (bytes) exceeds the device's, with
    both numbers, instead of a crash in the allocator half-way through building the model."""
    have = device_memory(device)
    if have and need > have:
        raise ValueError(f"{what} needs at least {need / 2 ** 30:,.1f} GiB but {device} has "
                         f"{have / 2 ** 30:,.1f} GiB: {hint}")


def check_finite(cfg: dict) -> None:
    """Every float setting of a run is a finite number: `--lr inf` or `--weight-decay nan` pass
    every `x > 0` / `x < 0` test (NaN compares false), so they are refused here, by name."""
    bad = [k for k, v in cfg.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} must be a finite number, got {cfg[bad[0]]}")


def save_checkpoint(path, *, model, optimizer, step: int, config: dict, extra: dict | None = None,
                    loop: dict | None = None) -> None:
    """Atomic checkpoint: model, optimiser, step, RNG states, config (and anything in extra);
    loop: train_loop's own running state (the training loss summed since the last log row)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": int(step),
             "rng": rng_state(), "config": dict(config), "extra": extra or {}, "loop": loop or {}}

    def write(tmp):
        # through a Python file object: a failed write (a full disk) is then an OSError with its
        # errno; torch.save(state, a_path) reports it as an opaque RuntimeError from its C++ writer
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(path, write)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; a missing, corrupt or truncated file is a
    ValueError with one sentence."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise ValueError(f"checkpoint {path} is corrupt or truncated (torch.load failed)") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng", "config"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint written by this project's training.py")
    return state


def config_defaults(later: dict | None = None) -> dict:
    """What a setting a saved config does not hold was made at: the settings added after some runs
    were made — the attention options (ode_attention.ATTENTION_OPTIONS, at "off") and a script's own
    ADDED_LATER — at their defaults. The one rule for old runs: resume (check_config) and the
    experiment runner's "is this kept run the one asked for" (experiments._made_with) both read it."""
    return {**ode_attention.ATTENTION_OPTIONS, **(later or {})}


def check_config(saved: dict, current: dict, keys, where: str = "the checkpoint", later: dict | None = None) -> None:
    """Refuse to resume a run whose model / data settings differ: name the first difference. A
    setting the saved config does not hold was made at its default (config_defaults(later))."""
    defaults = config_defaults(later)
    for k in keys:
        was = saved.get(k, defaults.get(k))
        if was != current.get(k):
            raise ValueError(f"{where} comes from another config: it has {k}={was!r} "
                             f"but this command asks for {k}={current.get(k)!r}")


def restore(state: dict, model: torch.nn.Module, optimizer) -> int:
    """Load model, optimiser and RNG states; return the step to continue from."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"the checkpoint does not fit this model ({first})") from None
    set_rng_state(state["rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------
# Run folder: config.json, versions.json, metrics.csv, loss.png
# ----------------------------------------------------------------------------------------------
def versions() -> dict:
    """What produced the numbers: interpreter, libraries, machine, git commit, command line."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "processor": platform.processor(),
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git_commit": commit or None, "argv": sys.argv}


class RunDir:
    """A run's folder.  Only the main process writes; other ranks get no-op calls."""
    FIELDS = ("step", "split", "metric", "value")

    def __init__(self, path, *, active: bool = True):
        self.path = Path(path)
        self.active = active
        self.ckpt = self.path / "ckpt.pt"
        self.metrics = self.path / "metrics.csv"
        self.loop_state: dict = {}       # train_loop's running sums, from the checkpoint resumed

    def lock(self, rt: "Runtime | None" = None) -> None:
        """Hold the folder's lock (.run.lock) for the life of the run (until teardown(rt), or the
        process's exit): a second run, or a second resume, on the same folder is refused with one
        sentence instead of mixing their files."""
        if self.active:
            self._lock = FolderLock(self.path, ".run.lock", "another training run")
            if rt is not None:
                rt.locks.append(self._lock)

    def write_json(self, name: str, obj) -> None:
        if self.active:
            atomic_write(self.path / name, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))

    def start(self, config: dict, *, resume_step: int | None = None) -> None:
        """A new run writes config.json, versions.json and the metrics header; a resumed run
        drops the metric rows written after its checkpoint (so the log matches an unbroken run)."""
        if not self.active:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json("config.json", config)
        self.write_json("versions.json", versions())
        rows = [r for r in self.read() if resume_step is not None and r["step"] <= resume_step]
        atomic_write(self.metrics, lambda tmp: self._write_rows(tmp, rows))

    def _write_rows(self, path, rows) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.FIELDS)
            w.writerows([(r["step"], r["split"], r["metric"], repr(r["value"])) for r in rows])

    def read(self) -> list[dict]:
        """metrics.csv as a list of dicts (malformed rows from a hard kill are skipped)."""
        if not self.metrics.exists():
            return []
        out = []
        with open(self.metrics, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    out.append({"step": int(row["step"]), "split": row["split"], "metric": row["metric"],
                                "value": float(row["value"])})
                except (TypeError, ValueError, KeyError):
                    continue
        return out

    def log(self, step: int, split: str, metrics: dict) -> None:
        """Append rows to metrics.csv, whole or not at all: a write that fails part-way (a full
        disk) is cut back off, so no half row is left to be read back as a wrong number."""
        if not self.active:
            return
        buf = io.StringIO()
        csv.writer(buf).writerows([(step, split, k, repr(float(v))) for k, v in metrics.items()])
        data = memoryview(buf.getvalue().encode("utf-8"))
        try:
            fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise _named(e, self.metrics) from None
        try:
            size = os.fstat(fd).st_size
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise _named(e, self.metrics) from None
        finally:
            os.close(fd)

    def plot(self, title: str = "", metric: str = "loss") -> None:
        """loss.png: `metric` against step, one line per split."""
        if not self.active:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        series: dict[str, list] = {}
        for r in self.read():
            if r["metric"] == metric:
                series.setdefault(r["split"], []).append((r["step"], r["value"]))
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-" if split == "train" else "o-", label=split, lw=1 if split == "train" else 1.5)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"{metric} (nats per token)" if metric == "loss" else metric)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if series:
            ax.legend()
        fig.tight_layout()
        atomic_write(self.path / "loss.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)


def open_run(*, resume, out, config: dict, model, optimizer, resume_keys, rt: Runtime, args=None,
             later: dict | None = None):
    """The run folder and the step to start from.  resume (a run folder or its ckpt.pt): load the
    checkpoint, refuse one whose `resume_keys` differ from `config` (a key the checkpoint lacks is
    read at its default: config_defaults(later), later = the script's ADDED_LATER), restore model,
    optimiser and RNG states.  Otherwise a new run in `out`, which must not already hold a checkpoint."""
    start = 0
    if resume:
        ck = Path(resume)
        run = RunDir(ck.parent if ck.suffix == ".pt" else ck, active=rt.is_main)
        run.lock(rt)
        state = load_checkpoint(run.ckpt)
        check_config(state["config"], config, resume_keys, where=f"the checkpoint {run.ckpt}", later=later)
        start = restore(state, model, optimizer)
        run.loop_state = dict(state.get("loop") or {}, step=start)   # train_loop picks it up
    else:
        run = RunDir(out, active=rt.is_main)
        run.lock(rt)
        if run.ckpt.exists():
            raise ValueError(f"{run.path} already holds a run: continue it with --resume {run.path} "
                             f"or choose another --out")
    run.start(config, resume_step=start if resume else None)
    if args is not None and not resume and rt.is_main:
        # the command line itself (what config.json does not hold: logging, checkpoint and probe
        # flags), so that `--resume RUN` alone continues with exactly these (resume_from_run)
        run.write_json("args.json", {k: v for k, v in vars(args).items() if k not in ("resume", "out")})
    return run, start


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------
class SignalStop(Exception):
    """Raised inside `GracefulExit.abortable()` when a stop signal arrives there."""


class GracefulExit:
    """Within `with GracefulExit() as g:`, SIGTERM / SIGINT set g.signum instead of killing the
    process; a second signal restores the default behaviour and re-raises at once.  Inside
    `with g.abortable():` (work that can simply be redone, such as the final evaluation) the
    first signal also raises SignalStop at once, so the stop does not wait for that work."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self._old = {}
        self._abortable = False

    def _handler(self, signum, frame):
        if self.signum is not None:  # second signal: give up waiting
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self._abortable:
            self._abortable = False
            raise SignalStop(signum)

    @contextmanager
    def abortable(self, enabled: bool = True):
        """A region the first signal interrupts (SignalStop) instead of waiting for it to end."""
        if enabled and self.signum is not None:   # the signal came just before the region
            raise SignalStop(self.signum)
        self._abortable = enabled
        try:
            yield
        finally:
            self._abortable = False

    def _restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.signals}
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
def _si(x: float) -> str:
    """11234.5 → "11.2k", 3.4e6 → "3.4M": a throughput for a log line."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def train_loop(model, optimizer, *, rt: Runtime, run: RunDir, config: dict, steps: int,
               batch_fn, loss_fn, eval_fn=None, raw_model=None, lr: float, warmup: int = 0,
               min_lr: float = 0.0, grad_accum: int = 1, clip: float = 0.0, eval_every: int = 0,
               ckpt_every: int = 0, log_every: int = 10, start_step: int = 0, unit: str = "tok",
               extra_state: dict | None = None, title: str = "") -> dict:
    """Run optimiser steps start_step .. steps-1.

    batch_fn(step, micro) -> this process's micro-batch;  loss_fn(model, batch) -> (mean loss,
    number of units in the batch);  eval_fn(raw_model, final) -> {split: {metric: value}}, called
    in eval mode under no_grad at every `eval_every` steps (final=False: it may subsample) and at
    the end (final=True: the whole evaluation set).  Returns
    {"status": "done" | "interrupted", "step", "signal", "eval": last eval}.
    """
    raw = raw_model if raw_model is not None else model
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel) or \
        isinstance(getattr(model, "_orig_mod", None), torch.nn.parallel.DistributedDataParallel)
    params = [p for p in raw.parameters() if p.requires_grad]
    last_eval: dict = {}
    saved = start_step if run.active and run.ckpt.exists() else None    # the last complete checkpoint

    def written(fn, *args):
        """fn(*args), a write into the run folder; a failure (a full disk, a folder gone read-only)
        stops the run with one sentence saying what is still intact and how to go on."""
        try:
            return fn(*args)
        except OSError as e:
            kept = (f"the checkpoint of step {saved} in {run.path} is intact: make room and continue "
                    f"with --resume {run.path}" if saved is not None else "no checkpoint was saved yet")
            raise ValueError(f"cannot write {e.filename or run.path} at step {step} "
                             f"({e.strerror or e}); {kept}") from None

    def evaluate(step, final=False, stop=None):
        """Evaluate and log.  With `stop` (the final evaluation, one process) a signal aborts the
        evaluation itself (SignalStop): the trained model is already saved, and nothing of an
        unfinished evaluation is written.  Under DDP every rank must finish the evaluation's
        collectives, so there the signal is honoured right after it."""
        nonlocal last_eval
        if eval_fn is None:
            return
        raw.eval()
        region = stop.abortable(not rt.distributed) if stop is not None else nullcontext()
        try:
            with region, torch.no_grad(), autocast(rt):
                result = eval_fn(raw, final)
        finally:
            raw.train()
        last_eval = result
        for split, metrics in last_eval.items():
            written(run.log, step, split, metrics)
        if rt.is_main:
            tqdm.write(f"step {step}: " + "  ".join(f"{s} {k} {v:.4f}" for s, m in last_eval.items()
                                                    for k, v in m.items()))
        written(run.plot, title)

    def save(step):
        nonlocal saved
        # never a checkpoint of non-finite weights: the loss is checked only at log steps, and an
        # update in between can turn the weights NaN — saving them would overwrite the last good
        # checkpoint with one that every resume and every fallback would then fail on
        if not all(bool(torch.isfinite(p).all()) for p in raw.parameters()):
            kept = f"the last checkpoint, step {saved}, is kept" if saved is not None else "no checkpoint was saved"
            raise ValueError(f"the weights became non-finite by step {step} ({kept}): lower --lr or raise --warmup")
        # the loss summed since the last log row goes into the checkpoint (its mean over ranks:
        # every rank restores it), so that a resumed run writes the rows of an unbroken one
        loop = {"loss_sum": all_reduce(loss_sum.clone(), rt, "mean").item(), "n_logged": n_logged}
        if rt.is_main:
            written(lambda: save_checkpoint(run.ckpt, model=raw, optimizer=optimizer, step=step,
                                            config=config, extra=extra_state, loop=loop))
            saved = step
        if rt.distributed:
            dist.barrier()

    step = start_step
    raw.train()
    loss_sum = torch.zeros((), device=rt.device)
    n_logged, units_since, t_since = 0, 0, time.perf_counter()
    resumed = run.loop_state
    if resumed.get("step") == start_step and "loss_sum" in resumed:   # the window a stop cut in two
        loss_sum.fill_(float(resumed["loss_sum"]))
        n_logged = int(resumed["n_logged"])
    # progress: a tqdm bar on a terminal; in a log file (stderr not a terminal) a bar's carriage-
    # return frames pile up by the thousand, so there one plain line per log step instead, like
    # nanoGPT's:  step 400 | loss 1.9300 | 11.2k tok/s | 35 s
    tty = rt.is_main and sys.stderr.isatty()
    t_start = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, unit="step", disable=not tty, dynamic_ncols=True)
    try:  # the bar is closed however the loop ends, so an error's sentence gets a line of its own
        with GracefulExit() as stop:
            while step < steps:
                # the learning rate of this step, from the schedule
                lr_now = cosine_lr(step, lr=lr, total=steps, warmup=warmup, min_lr=min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now * group.get("lr_scale", 1.0)
                units = 0
                for micro in range(grad_accum):
                    batch = batch_fn(step, micro)
                    # skip DDP's gradient all-reduce on all but the last micro-batch
                    sync = nullcontext() if (not ddp or micro == grad_accum - 1) else model.no_sync()
                    with sync:
                        with autocast(rt):
                            loss, n = loss_fn(model, batch)
                        # accumulate ∇(loss / k): the mean over the k micro-batches
                        (loss / grad_accum).backward()
                    loss_sum += loss.detach().float() / grad_accum
                    units += int(n)
                # g ← g · min(1, c / ‖g‖)  (c = inf only measures the norm)
                gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                n_logged += 1
                units_since += units * rt.world_size
                bar.update(1)
                stop_now = stop.requested
                if rt.distributed:  # all ranks stop at the same step
                    flag = torch.tensor(float(stop_now), device=rt.device)
                    stop_now = bool(all_reduce(flag, rt, "max").item())
                # (not at a stop: the open window's sum goes into the checkpoint instead, and the
                # resumed run writes this row at the step an unbroken run would)
                if step % max(1, log_every) == 0 or step == steps:
                    # mean training loss over the steps since the last log line, averaged over ranks
                    mean_loss = all_reduce(loss_sum / n_logged, rt, "mean").item()
                    if not math.isfinite(mean_loss):
                        raise ValueError(f"the training loss became {mean_loss} at step {step}: "
                                         f"lower --lr or raise --warmup")
                    dt = time.perf_counter() - t_since
                    rate = units_since / max(dt, 1e-9)
                    written(run.log, step, "train", {"loss": mean_loss, "lr": lr_now,
                                                     "grad_norm": float(gnorm), f"{unit}_per_s": rate})
                    bar.set_postfix({"loss": f"{mean_loss:.4f}", f"{unit}/s": f"{rate:,.0f}"})
                    if rt.is_main and not tty:
                        print(f"step {step} | loss {mean_loss:.4f} | {_si(rate)} {unit}/s | "
                              f"{time.perf_counter() - t_start:.0f} s", flush=True)
                    loss_sum.zero_()
                    n_logged, units_since, t_since = 0, 0, time.perf_counter()
                if eval_every and step % eval_every == 0 and step < steps:
                    evaluate(step)
                    t_since = time.perf_counter()  # the throughput counts training time only
                # the last step is saved before the final evaluation: a stop during that
                # evaluation loses nothing of the training (--resume then only evaluates)
                if stop_now or step == steps or (ckpt_every and step % ckpt_every == 0):
                    save(step)
                if stop_now:
                    return {"status": "interrupted", "step": step, "signal": stop.signum, "eval": last_eval}
            bar.close()
            # the final evaluation on the whole evaluation set (also when a resumed run had
            # nothing left to train: then it evaluates what the checkpoint holds)
            try:
                evaluate(step, final=True, stop=stop)
            except SignalStop:
                pass
            if eval_fn is None:
                written(run.plot, title)
            stop_now = stop.requested
            if rt.distributed:
                flag = torch.tensor(float(stop_now), device=rt.device)
                stop_now = bool(all_reduce(flag, rt, "max").item())
            if stop_now:
                return {"status": "interrupted", "step": step, "signal": stop.signum or signal.SIGTERM,
                        "eval": last_eval, "during": "final evaluation"}
    finally:
        bar.close()
    return {"status": "done", "step": step, "signal": None, "eval": last_eval}


# ----------------------------------------------------------------------------------------------
# Token probe (shared by train_lm.py and train_vit.py)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def token_probe(model: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """Per layer l = 0..L: mean ± std over the batch of the four probes of docs/dynamics.md §5.4
    (ode_attention.PROBES), for full blocks and for attention-only updates x ← x + Attn(x).
    `model.hidden(x, attention_only=..., record=list)` must append the token states after the
    input and after every block (both training scripts' models do)."""
    rows = []
    for mode, attention_only in (("full", False), ("attention-only", True)):
        states: list = []
        model.hidden(x, attention_only=attention_only, record=states)
        for layer, X in enumerate(states):
            for name, fn in ode_attention.PROBES.items():
                v = fn(X.double())                                             # (batch,)
                rows.append({"mode": mode, "layer": layer, "metric": name, "mean": float(v.mean()),
                             "std": float(v.std()) if v.numel() > 1 else 0.0})
    return rows


def realised_inertia(model: torch.nn.Module) -> list[dict]:
    """regimes.realised_inertia of every definiteness-constrained form in the model (each
    constrained layer's W_form and A_form), named by module path: the inertia its L D Lᵀ really
    has in the dtype training ran in, against the one prescribed. Empty for a free model. Prints
    one warning line per form whose inertia the float arithmetic lost (Sylvester's law holds in
    exact arithmetic only), so that a "convergent" run that is not is said to be so."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, regimes.PrescribedInertia):
            r = regimes.realised_inertia(m)
            out.append({"module": name, **r})
            if not r["kept"]:
                print(f"warning: {name} was built with inertia {r['prescribed']} but its {r['dtype']} "
                      f"L D Lᵀ has {r['realised']} (cond(L|D|^½) = {r['kappa']:.2g}): the constrained regime "
                      "is not realised", file=sys.stderr)
    return out


def value_map_stats(attn) -> dict:
    """The realised value map of an ode_attention.Attention, M = V O (V alone when constrained):
    near X = 0 every softmax row is uniform, so the mean token obeys x̄' = x̄ M (x̄ ← x̄ (I + M) under
    the block's unit Euler step). α(M) = max Re λ(M), n_re_pos = #{Re λ > 0} (the field's mean mode
    unstable), n_euler_unstable = #{|1 + λ| > 1} (the unit step's), and ρ_A = ‖A_anti‖/‖A_sym‖ for
    A = W M⁻ᵀ, W = Σₕ QₕKₕᵀ (for one head the identity xᵢᵀAẋᵢ = Σⱼ Pᵢⱼ xᵢᵀWxⱼ; for several, the
    same matrices as a summary)."""
    with torch.no_grad():
        Q, K, V, O = (None if m is None else m.detach().double() for m in attn.qkv_matrices())
        M = V if O is None else V @ O
        ev = torch.linalg.eigvals(M)
        W = Q @ K.T
        rho = float(regimes.antisymmetry_ratio(regimes.value_form(W, M)))
    return {"abscissa_V": float(ev.real.max()), "n_re_pos": int((ev.real > 0).sum()),
            "n_euler_unstable": int(((1 + ev).abs() > 1).sum()), "rho_A": rho, "d": int(M.shape[0])}


def layer_fields(model: torch.nn.Module, idx: torch.Tensor, *, t_end: float = 20.0, dt: float = 0.1,
                 max_norm: float = 1e6, drop_rope: bool = False) -> list[dict]:
    """Per block l of a model with `hidden(idx, record=...)` (train_lm's GPT on token ids, train_vit's
    ViT on normalised images, whose 2-D RoPE rotates by its patch positions): value_map_stats of its
    attention, and the fate of that layer's OWN field dX/dt = Attn_l(X) (its multi-head attention,
    weights frozen, float64, the causal mask included) from X⁰ = LN₁(h_l), the LayerNorm'd tokens
    that reach it on `idx`: RK4 with step dt to t_end, saved on a log grid; growth = mean token
    norm at the end / at 0, the late log–log slope over [t_end/10, t_end] and ode_attention.fate.
    An instance whose largest token norm passes max_norm is stopped there and grows. Also, at X⁰:
    the attention entropy −Σⱼ Pᵢⱼ log Pᵢⱼ (mean over heads and queries) and the effective rank of the
    centred normalised tokens (ode_attention.effective_rank; the geometry through depth).

    drop_rope: the same weights, the same inputs X⁰, but RoPE removed from the field (q, k
    unrotated): whether the layer's fate depends on the rotation (the phase diagrams predict an
    effect without a causal mask only)."""
    m = copy.deepcopy(model).to(idx.device).double().eval()
    if drop_rope:
        for blk in m.blocks:
            if blk.attn.pe == "none":
                raise ValueError("drop_rope needs a model whose attention uses RoPE.")
            blk.attn.pe = "none"                                  # _rotate then leaves q, k as they are
    n = idx.shape[-1] if idx.dim() == 2 else None                # token ids (B, n); images have no n here
    idx = idx.double() if idx.is_floating_point() else idx       # images: float64, as the copy's weights
    attn_bias = m.alibi[:, :n, :n] if getattr(m, "pe", None) == "alibi" else None
    # the ViT's (row, column) per patch for 2-D RoPE (its class token, first, is not rotated); the LM: none
    positions = m.positions if getattr(m, "rope", False) is True else None
    t_save = ode_attention.log_times(t_end, 31)
    rows = []
    with torch.no_grad():
        states: list = []
        m.hidden(idx, record=states)
        for l, blk in enumerate(m.blocks):
            x = blk.ln1(states[l])
            P = blk.attn.weights(x, positions=positions, attn_bias=attn_bias)     # (B, H, n, n)
            entropy = float((-(P * P.clamp_min(1e-300).log()).sum(-1)).mean())
            erank = float(ode_attention.effective_rank(x).mean())
            f = lambda t, X, a=blk.attn: a(X, positions=positions, attn_bias=attn_bias)  # noqa: E731
            N0 = ode_attention.token_norm(x)
            norms, t, alive, t_reached = [N0], 0.0, torch.ones(len(x), dtype=torch.bool), torch.full((len(x),), t_end)
            for ts in t_save[1:].tolist():
                while t < ts - 1e-12:
                    h = min(dt, ts - t)
                    x_new = ode_attention.rk4_step(f, t, x, h)
                    big = ~(torch.linalg.vector_norm(x_new, dim=-1).amax(-1) <= max_norm)
                    t_reached[alive & big] = t + h
                    alive &= ~big
                    x = torch.where(alive[:, None, None], x_new, x)               # the blown keep their last state
                    t += h
                    if not alive.any():
                        break
                norms.append(ode_attention.token_norm(x))
            N = torch.stack(norms)                                               # (T, B)
            slope, _ = ode_attention.late_slopes(t_save[: len(N)], N, t_reached)
            fates = [ode_attention.fate(p, False, not bool(a)) for p, a in zip(slope, alive)]
            rows.append({"layer": l, **value_map_stats(blk.attn),
                         "growth": float((N[-1] / N[0]).median()), "slope": float(np.nanmedian(slope)),
                         "fates": {k: fates.count(k) for k in ode_attention.FATES},
                         "attention_entropy": entropy, "effective_rank": erank,
                         "rope_in_field": blk.attn.pe != "none"})
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict], fieldnames: list | None = None) -> None:
    """rows as a CSV file with a header (the first row's keys unless `fieldnames`), written atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def write_probe(rows: list[dict], run: "RunDir", title: str, what: str = "validation windows") -> None:
    """probe.csv and probe.png (one panel per probe, full blocks vs attention-only) in the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    write_csv(run.path / "probe.csv", rows, ["mode", "layer", "metric", "mean", "std"])
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, metric in zip(axes, ode_attention.PROBES):
        for mode, style in (("full", "o-"), ("attention-only", "s--")):
            pts = [(r["layer"], r["mean"]) for r in rows if r["metric"] == metric and r["mode"] == mode
                   and math.isfinite(r["mean"])]
            if pts:
                ax.plot(*zip(*pts), style, label=mode, ms=3)
        if metric in ("norm", "pairwise_distance"):
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"token probe ({what}): {title}", fontsize=9)
    fig.tight_layout()
    atomic_write(run.path / "probe.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line: the flags both scripts share; bad input is one sentence and exit code 2
# ----------------------------------------------------------------------------------------------
# ValueError: bad input; OSError: the environment (a missing or unreadable file, a folder that
# is read-only or lies under a file, a full disk, a network that is down)
USER_ERRORS = (ValueError, OSError)


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a ValueError (one sentence, exit 2 through run_cli)
    instead of printing its usage block."""

    def error(self, message):
        raise ValueError(message)


def add_attention_args(a) -> None:
    """--lam, --lam-mode, --regime: the same flags, with the same meaning, in both training scripts."""
    a("--lam", type=float, default=0.0, help="initial λ of the λ-term, any sign; 0 = off (default)")
    a("--lam-mode", choices=ode_attention.LAM_MODES, default="identity",
      help="identity: λₕ I per head; softplus-diag: diag(softplus(φ)) > 0 (the authors')")
    a("--regime", choices=ode_attention.REGIMES, default="free",
      help="free attention, or constrained W_sym ≻ 0 with A_sym ≻ 0 / mixed / ≺ 0 (PD / HD / ND)")
    a("--symmetric-A", action="store_true",
      help="constrained regimes: A symmetric (no antisymmetric part T_A; ND's V is then Hurwitz)")
    a("--rho-cap", type=float, default=0.0,
      help="constrained regimes: keep ρ = ‖T_A‖₂/‖S_A‖₂ ≤ this (0 = no cap, default)")
    a("--lam-frozen", action="store_true", help="keep λ at its initial value (a control: not trained)")
    a("--extra-qk", action="store_true",
      help="free regime: a second, unrotated, learned q/k channel of width d_h per head (the λ-term's "
           "capacity control: the same extra logit rank, no sign)")


def attention_options(cfg: dict) -> dict:
    """The ode_attention.ATTENTION_OPTIONS a config asks for (a config written before an option
    existed: that option off)."""
    return {k: cfg.get(k, off) for k, off in ode_attention.ATTENTION_OPTIONS.items()}


def check_attention_options(cfg: dict) -> None:
    """The attention options' combinations, refused in one sentence naming the flags (before any
    model is built or data read)."""
    o = attention_options(cfg)
    if not (math.isfinite(o["rho_cap"]) and o["rho_cap"] >= 0):
        raise ValueError(f"--rho-cap must be 0 (off) or a positive number, got {o['rho_cap']}")
    if (o["symmetric_A"] or o["rho_cap"]) and cfg["regime"] == "free":
        raise ValueError("--symmetric-A and --rho-cap constrain A, so they need --regime divergent, "
                         "intermediate or convergent")
    if o["symmetric_A"] and o["rho_cap"]:
        raise ValueError("--rho-cap caps A's antisymmetric part, which --symmetric-A removes: give one of them")
    if o["lam_frozen"] and not cfg["lam"]:
        raise ValueError("--lam-frozen freezes the λ-term, so it needs --lam ≠ 0")
    if o["extra_qk"] and cfg["regime"] != "free":
        raise ValueError("--extra-qk adds a learned logit channel, which a constrained regime's exact "
                         "logit form does not allow: use it with --regime free")


def add_run_args(a, *, default_out: str, cache_help: str, probe_help: str) -> None:
    """The run and device flags both training scripts share."""
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10, help="training-loss rows in metrics.csv every N steps")
    a("--ckpt-every", type=int, default=0, help="checkpoint every N steps (default: at each evaluation)")
    a("--probe-batch", type=int, default=8, help=probe_help)
    a("--out", help=f"run folder (default {default_out})")
    a("--resume", metavar="RUN", help="continue the run in RUN (its folder or ckpt.pt) with the flags it was "
      "started with; --steps may be raised, eval/logging/device flags may change, the rest must match")
    a("--cache-dir", default=str(Path(__file__).resolve().parent / "cache"), help=cache_help)
    a("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    a("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    a("--no-amp", action="store_true", help="float32 instead of bf16 autocast on CUDA")


# a resumed run may not change these: they decide the optimisation itself (the rest of the
# trajectory would belong to another run). Evaluation, logging and device flags may change.
RESUME_FIXED = ("lr", "min_lr", "warmup", "warmup_epochs", "beta2", "weight_decay", "clip", "grad_accum")


def given_flags(build_parser, argv) -> set:
    """The dests of the options written on this command line (not left at their defaults): the
    same parser with every default suppressed, so that only what was given lands in the result."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(p.parse_args(argv)))


def resume_from_run(args, build_parser, argv) -> None:
    """`--resume RUN` alone continues RUN as it was started (nanoGPT's init_from='resume'): every
    flag not given on this command line takes its value from RUN/args.json (the command line RUN
    was started with), or, for a run older than that file, from RUN/config.json. --steps may be
    raised (train longer; the cosine schedule stretches to the new total). A flag given with a
    value that differs from the run's is refused in one sentence when it would change the
    optimisation (RESUME_FIXED) — the model and data flags are refused later, by the checkpoint's
    own check (check_config); evaluation, logging and device flags simply apply."""
    if not args.resume:
        return
    ck = Path(args.resume)
    folder = ck.parent if ck.suffix == ".pt" else ck

    def read(name):
        try:
            d = json.loads((folder / name).read_text())
        except FileNotFoundError:
            return None                 # no run there (the checkpoint's own check says so), or an old run
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {folder / name} ({e}): it is not the {name} of a run") from None
        if not isinstance(d, dict):
            raise ValueError(f"{folder / name} is not the {name} of a run")
        return d
    saved, cmd = read("config.json"), read("args.json")
    if saved is None:
        return
    cfg_path = folder / "config.json"
    given = given_flags(build_parser, argv)
    source = cmd if cmd is not None else saved
    for dest in vars(args):
        # (--device is this machine's business: a run started on a GPU may be continued on a CPU)
        if dest in source and dest not in given and dest not in ("resume", "out", "device"):
            setattr(args, dest, source[dest])
    for dest in RESUME_FIXED:
        if dest in given and dest in saved and getattr(args, dest) != saved[dest]:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, dest)} differs from the {saved[dest]} that {cfg_path.parent} "
                             f"was started with, and resuming cannot change it: drop {flag}, or start a new "
                             f"run with --out")


def check_run_folders(args, out, *, uses_cache: bool = True) -> None:
    """The folders of add_run_args, checked before any data is read or model built: the run folder
    (`out`, or the one --resume names) can be created and written, and, when the data will be
    cached (uses_cache), --cache-dir is a folder or can become one (it may be read-only: a cache
    that already holds the data is only read)."""
    if args.resume:
        ck = Path(args.resume)
        folder = ck.parent if ck.suffix == ".pt" else ck
        # --resume continues the run where it is: an --out elsewhere would be silently ignored
        # (checked once RUN exists: a RUN that does not is said first, as "no checkpoint")
        if getattr(args, "out", None) and folder.exists() and Path(args.out).resolve() != folder.resolve():
            raise ValueError(f"--resume {args.resume} continues the run in {folder}, so --out {args.out} "
                             f"would be ignored: drop --out (or give the same folder)")
        check_folder(folder, "--resume")
    else:
        check_folder(out, "--out")
    if uses_cache:
        check_folder(args.cache_dir, "--cache-dir", writable=False)


def interrupted_exit(result: dict, run: "RunDir", rt: "Runtime") -> int:
    """After train_loop stopped on SIGTERM/SIGINT: say where to resume; exit code 128 + signal."""
    if rt.is_main and result.get("during") == "final evaluation":
        print(f"stopped by signal {result['signal']} during the final evaluation: training is complete "
              f"and step {result['step']} is saved; --resume {run.path} runs the final evaluation "
              f"(and writes the summary) without training", file=sys.stderr)
    elif rt.is_main:
        print(f"stopped by signal {result['signal']} after step {result['step']}: checkpoint saved; "
              f"continue with --resume {run.path}", file=sys.stderr)
    return 128 + int(result["signal"])


def run_cli(main, argv=None) -> int:
    """Call main(argv); turn a user error into one sentence on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.errno is not None and e.strerror:
            msg = e.strerror                                     # not "[Errno 28] ..."
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.strerror or 'cannot open'}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (loading data, building the model, writing the report;
        # inside it GracefulExit saves a checkpoint first): one line, the shell's 128 + SIGINT
        print("interrupted (Ctrl-C) outside the training loop, so no checkpoint was written by this stop",
              file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    parser = ArgParser(description=__doc__.split("\n\n")[0] + " (a library: run "
                                     "train_lm.py or train_vit.py).  This entry point prints the "
                                     "warmup+cosine schedule for the given settings.")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--min-lr", type=float, default=0.0)

    def _main(argv):
        a = parser.parse_args(argv)
        if a.steps < 1 or a.warmup < 0 or a.lr <= 0:
            raise ValueError("--steps must be ≥ 1, --warmup ≥ 0 and --lr > 0")
        for s in sorted({0, a.warmup - 1, a.warmup, a.steps // 2, a.steps - 1} - {-1}):
            print(f"step {s:>6}  lr {cosine_lr(s, lr=a.lr, total=a.steps, warmup=a.warmup, min_lr=a.min_lr):.3e}")
    sys.exit(run_cli(_main))
