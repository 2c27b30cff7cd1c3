"""Environment faults and absurd sizes, for every script that writes a run or a figure: a read-only
output folder, one under a regular file, a disk that fills up mid-run, a --cache-dir that is a
file, a batch or a sequence no machine holds.  Each case is one sentence on stderr, exit code 2,
and nothing half-written left behind (no temporary file, no partial ckpt.pt, no half row).

The scripts' main functions run in-process through training.run_cli (no subprocess: fast).  A full
disk is /dev/full behind the temporary name a file is written to (a real ENOSPC from the kernel);
where that cannot express the case (an append to metrics.csv, the second save of a checkpoint, a
system without /dev/full), Python's open() / os.write stop with ENOSPC part-way.  chmod does not
stop root, so when the tests run as root a read-only folder is simulated by refusing every write
into it (EACCES), and a read-only mount (EROFS) is always simulated that way.
"""
from __future__ import annotations

import argparse
import builtins
import errno
import io
import os
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  (AdamW imports it on first use: ~2 s, paid here, not in one case)

import rope
import train_lm
import train_vit
import training
from analysis import bench, simulate
from spectral import decomposition

LM = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
      "--warmup", "0", "--eval-tokens", "64", "--probe-batch", "2", "--device", "cpu", "--log-every", "1",
      "--steps", "1", "--data", "{d}/english.txt", "--cache-dir", "{d}/cache"]
VIT = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--mlp-ratio", "2", "--batch-size", "8",
       "--warmup", "0", "--eval-images", "64", "--probe-batch", "2", "--device", "cpu", "--log-every", "1",
       "--steps", "1", "--cache-dir", "{d}/cache"]
BENCH = ["--device", "cpu", "--instances", "8", "--t-end", "0.1", "--dt", "0.05", "--d-model", "16",
         "--n-layers", "1", "--n-heads", "2", "--seq-len", "8", "--batch-size", "2", "--rounds", "1",
         "--steps", "1"]
PREFIXES = ("error: ", "simulate.py: ", "spectral.decomposition: ")     # run_cli's, and two scripts' own
MAINS = {"train_lm": train_lm.main, "train_vit": train_vit.main, "analysis.bench": bench.main,
         "analysis.simulate": simulate.main, "rope": rope.main, "spectral.decomposition": decomposition.main}

# id: (script, argv ({d} = the test's folder), fault set up before the call, a fragment of the sentence)
# Faults: read-only:F (EACCES: chmod, or refused writes when root), read-only-fs:F (EROFS, a read-only
# mount), full:F/NAME (ENOSPC while writing NAME, atomically: /dev/full), full-open:F/NAME (the same,
# through Python's open), full-after-K:F/NAME (the same once K writes of NAME went through),
# full-append:F/NAME (ENOSPC half-way through appending to NAME), none.
# Every case but the full* ones must create nothing at all.
CASES = {
    "lm --out in a read-only folder": ("train_lm", [*LM, "--out", "{d}/ro/run"], "read-only:ro",
                                       "--out {d}/ro/run cannot be written: {d}/ro refuses new files"),
    "lm --out on a read-only mount": ("train_lm", [*LM, "--out", "{d}/ro/run"], "read-only-fs:ro",
                                      "(Read-only file system)"),
    "lm --out under a regular file": ("train_lm", [*LM, "--out", "{d}/afile/run"], "none",
                                      "--out {d}/afile/run lies under {d}/afile, which is not a folder"),
    "lm --out is a regular file": ("train_lm", [*LM, "--out", "{d}/afile"], "none",
                                   "--out {d}/afile is not a folder"),
    "lm disk full at the checkpoint": ("train_lm", [*LM, "--steps", "2", "--ckpt-every", "1", "--out", "{d}/run"],
                                       "full:run/ckpt.pt",
                                       "cannot write {d}/run/ckpt.pt at step 1 (No space left on device); "
                                       "no checkpoint was saved yet"),
    "lm disk full after a checkpoint": ("train_lm", [*LM, "--steps", "3", "--ckpt-every", "1", "--out", "{d}/run"],
                                        "full-after-1:run/ckpt.pt",
                                        "cannot write {d}/run/ckpt.pt at step 2 (No space left on device); the "
                                        "checkpoint of step 1 in {d}/run is intact: make room and continue with "
                                        "--resume {d}/run"),
    "lm disk full in a metrics row": ("train_lm", [*LM, "--out", "{d}/run"], "full-append:run/metrics.csv",
                                      "cannot write {d}/run/metrics.csv at step 1 (No space left on device)"),
    "lm --cache-dir is a regular file": ("train_lm", [*LM, "--data", "pydocs", "--cache-dir", "{d}/afile",
                                                      "--out", "{d}/run"], "none",
                                         "--cache-dir {d}/afile is not a folder"),
    "lm --cache-dir under a regular file": ("train_lm", [*LM, "--data", "pydocs", "--cache-dir", "{d}/afile/c",
                                                         "--out", "{d}/run"], "none", "lies under {d}/afile"),
    "vit --out in a read-only folder": ("train_vit", [*VIT, "--out", "{d}/ro/run"], "read-only:ro",
                                        "--out {d}/ro/run cannot be written"),
    "vit --out under a regular file": ("train_vit", [*VIT, "--out", "{d}/afile/run"], "none",
                                       "lies under {d}/afile, which is not a folder"),
    "vit disk full at the checkpoint": ("train_vit", [*VIT, "--steps", "2", "--ckpt-every", "1", "--out",
                                                      "{d}/run"], "full:run/ckpt.pt",
                                        "cannot write {d}/run/ckpt.pt at step 1 (No space left on device)"),
    "vit --cache-dir is a regular file": ("train_vit", [*VIT, "--data", "cifar10", "--cache-dir", "{d}/afile",
                                                        "--out", "{d}/run"], "none",
                                          "--cache-dir {d}/afile is not a folder"),
    "vit --batch-size 10^10": ("train_vit", [*VIT, "--batch-size", "10000000000", "--out", "{d}/run"], "none",
                               "this run needs at least"),
    "bench --out in a read-only folder": ("analysis.bench", [*BENCH, "--out", "{d}/ro/b"], "read-only:ro",
                                          "--out {d}/ro/b cannot be written"),
    "bench --out on a read-only mount": ("analysis.bench", [*BENCH, "--out", "{d}/ro/b"], "read-only-fs:ro",
                                         "(Read-only file system)"),
    "bench --out under a regular file": ("analysis.bench", [*BENCH, "--out", "{d}/afile/b"], "none",
                                         "lies under {d}/afile, which is not a folder"),
    "bench disk full at bench.json": ("analysis.bench", [*BENCH, "--out", "{d}/b"], "full:b/bench.json",
                                      "No space left on device: {d}/b/bench.json"),
    "simulate disk full at summary.json": ("analysis.simulate", ["--n", "4", "--t-end", "0.2", "--dt", "0.1",
                                                                 "--out", "{d}/sim"], "full-open:sim/summary.json",
                                           "No space left on device"),
    "simulate --n 10^6": ("analysis.simulate", ["--n", "1000000", "--out", "{d}/sim"], "none",
                          "--n 1000000 tokens in --d 2 needs at least 14,9"),
    "rope --n 10^6": ("rope", ["--n", "1000000", "--out", "{d}/fig/rope.png"], "none",
                      "--n 1000000 needs at least 70,7"),
    "spectral --n 10^6": ("spectral.decomposition", ["--n", "16,1000000", "--freqs", "1", "--trials", "1",
                                                     "--out", "{d}/spec"], "none",
                          "the sweep at --n 1000000 needs at least 37,25"),
}


@pytest.fixture(scope="module")
def english():
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))[:20000].encode("utf-8")


@pytest.fixture(autouse=True)
def no_git(monkeypatch):
    """versions() asks git for the commit in a subprocess: not needed here, and slow."""
    monkeypatch.setattr(training, "versions", lambda: {"git_commit": None})


def _inside(path, folder: Path) -> bool:
    try:
        p = os.path.abspath(os.fspath(path))
    except TypeError:                                   # a file descriptor
        return False
    return p == str(folder) or p.startswith(str(folder) + os.sep)


def refuse_writes(monkeypatch, folder: Path, code: int) -> None:
    """Every creation, write or rename into `folder` fails with `code`, as a read-only folder's do."""
    fail = lambda p: OSError(code, os.strerror(code), os.fspath(p))          # noqa: E731
    real_open, real_os_open, real_mkdir, real_replace = builtins.open, os.open, os.mkdir, os.replace

    def os_open(path, flags, *a, **k):
        if _inside(path, folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise fail(path)
        return real_os_open(path, flags, *a, **k)

    def py_open(file, mode="r", *a, **k):
        if _inside(file, folder) and set(mode) & set("wax+"):
            raise fail(file)
        return real_open(file, mode, *a, **k)

    def mkdir(path, *a, **k):
        if _inside(path, folder) and not os.path.isdir(path):
            raise fail(path)
        return real_mkdir(path, *a, **k)

    def replace(src, dst, *a, **k):
        if _inside(dst, folder):
            raise fail(dst)
        return real_replace(src, dst, *a, **k)

    for target, name, fn in ((os, "open", os_open), (builtins, "open", py_open), (io, "open", py_open),
                             (os, "mkdir", mkdir), (os, "replace", replace)):
        monkeypatch.setattr(target, name, fn)


def read_only(monkeypatch, folder: Path) -> None:
    """chmod 555; where that does not stop writes (root), refuse them with EACCES instead."""
    folder.chmod(0o555)
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT)
    except PermissionError:
        return                                          # a real read-only folder
    os.close(fd)
    os.unlink(folder / ".probe")
    refuse_writes(monkeypatch, folder, errno.EACCES)


class _FullFile:
    """A file on a disk with `room` bytes left: the write that passes it writes what fits, then fails."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[:self._room])
            self._f.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, target: Path, *, append: bool, room: int = 0, skip: int = 0,
              dev_full: bool = True) -> None:
    """The disk fills up while `target` is written, from the (skip + 1)-th time on: an append to it
    (append=True: a Python file or an os.open'ed descriptor) or the write of its temporary file
    (atomic_write's .NAME.tmp<pid>) stops with ENOSPC after `room` bytes.  A first whole-file write
    goes to /dev/full where the system has it (a real kernel ENOSPC whatever writes it, torch's C++
    writer included) unless dev_full=False; otherwise Python's open() hands out a file that fills up."""
    tmp_prefix = f".{target.name}.tmp"
    if dev_full and not append and not skip and os.path.exists("/dev/full"):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/dev/full", target.parent / f"{tmp_prefix}{os.getpid()}")
        return
    if append:
        hit = lambda p: os.path.abspath(os.fspath(p)) == str(target)                        # noqa: E731
    else:
        hit = lambda p: Path(p).parent == target.parent and Path(p).name.startswith(tmp_prefix)  # noqa: E731
    real_open, real_os_open, real_write, real_close = builtins.open, os.open, os.write, os.close
    seen, full_fds = [0], set()

    def full_now(path) -> bool:
        if isinstance(path, int) or not hit(path):
            return False
        seen[0] += 1
        return seen[0] > skip

    def py_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        wants = "a" in mode if append else bool(set(mode) & set("wx"))
        return _FullFile(f, room) if wants and full_now(file) else f

    def os_open(path, flags, *a, **k):
        fd = real_os_open(path, flags, *a, **k)
        if flags & os.O_APPEND and full_now(path):
            full_fds.add(fd)
        return fd

    def os_write(fd, data):
        if fd in full_fds:
            real_write(fd, bytes(data)[:room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def os_close(fd):
        full_fds.discard(fd)
        return real_close(fd)

    patches = [(builtins, "open", py_open), (io, "open", py_open)]
    if append:
        patches += [(os, "open", os_open), (os, "write", os_write), (os, "close", os_close)]
    for module, name, fn in patches:
        monkeypatch.setattr(module, name, fn)


def _tree(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_fault_is_one_sentence_exit_2_and_leaves_nothing_half_written(case, tmp_path, english, monkeypatch,
                                                                        capsys):
    script, argv, fault, fragment = CASES[case]
    d = tmp_path
    (d / "english.txt").write_bytes(english)
    (d / "afile").write_text("a regular file\n")
    (d / "ro").mkdir()
    kind, _, where = fault.partition(":")
    if kind == "read-only":
        read_only(monkeypatch, d / "ro")
    elif kind == "read-only-fs":
        refuse_writes(monkeypatch, d / "ro", errno.EROFS)
    elif kind.startswith("full"):
        (d / where).parent.mkdir(parents=True, exist_ok=True)
        # an append stops inside the first row's loss value: "1,train,loss,5.5" would read back as a number
        fill_disk(monkeypatch, d / where, append=kind == "full-append", room=16 if kind == "full-append" else 0,
                  skip=int(kind.rpartition("-")[2]) if kind.startswith("full-after") else 0,
                  dev_full=kind == "full")
    before = _tree(d)
    try:
        code = training.run_cli(MAINS[script], [a.format(d=d) for a in argv])
    finally:
        (d / "ro").chmod(0o755)
        monkeypatch.undo()                              # the real os / open again, for the checks below
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]             # a progress bar may sit on the lines above
    assert "Traceback" not in err and sum(line.startswith(PREFIXES) for line in err.split("\n")) == 1, err
    assert fragment.format(d=d) in last and "\r" not in last and err.endswith("\n"), err
    assert last.startswith(PREFIXES), err
    new = _tree(d) - before
    assert not [p for p in _tree(d) if ".tmp" in p], _tree(d)          # no temporary file, /dev/full gone
    if not kind.startswith("full"):
        assert not new, new                                               # nothing created at all
        return
    for ck in [p for p in new if p.endswith("ckpt.pt")]:                  # no partial checkpoint: a
        assert training.load_checkpoint(d / ck)["step"] == 1                 # whole one, the last saved
    if "no checkpoint was saved yet" in fragment:
        assert not [p for p in new if p.endswith("ckpt.pt")]
    if script not in ("train_lm", "train_vit"):                          # all the outputs or none
        assert not new, new
    metrics = d / "run" / "metrics.csv"
    if metrics.exists():                                                  # whole rows only
        lines = metrics.read_text().splitlines()
        assert metrics.read_bytes().endswith(b"\r\n") and lines[0] == "step,split,metric,value"
        assert all(len(r.split(",")) == 4 and float(r.split(",")[3]) == float(r.split(",")[3]) for r in lines[1:])
        if kind == "full-append":                                         # the failed row is cut off again
            assert lines == ["step,split,metric,value"]


def test_a_checkpoint_still_loads_after_a_failed_save_beside_it(tmp_path, monkeypatch):
    """A save that fails on a full disk keeps the previous checkpoint as it was."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck = tmp_path / "ckpt.pt"
    training.save_checkpoint(ck, model=model, optimizer=opt, step=3, config={"a": 1})
    good = ck.read_bytes()
    fill_disk(monkeypatch, ck, append=False)
    with pytest.raises(OSError, match="No space left on device") as e:
        training.save_checkpoint(ck, model=model, optimizer=opt, step=4, config={"a": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(ck)
    monkeypatch.undo()
    assert ck.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert training.load_checkpoint(ck)["step"] == 3


def test_check_folder_refuses_files_and_creates_nothing(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    for path, msg in ((tmp_path / "f", "is not a folder"), (tmp_path / "f" / "a" / "b", "lies under")):
        with pytest.raises(ValueError, match=msg):
            training.check_folder(path, "--out")
    training.check_folder(tmp_path / "new" / "deep", "--out")              # creatable: fine
    # --cache-dir is checked only where the data is cached: a local text file trains as before
    args = argparse.Namespace(resume=None, cache_dir=str(tmp_path / "f"))
    training.check_run_folders(args, tmp_path / "run", uses_cache=False)
    with pytest.raises(ValueError, match="--cache-dir .* is not a folder"):
        training.check_run_folders(args, tmp_path / "run", uses_cache=True)
    assert sorted(os.listdir(tmp_path)) == ["f"]
    refuse_writes(monkeypatch, tmp_path, errno.EROFS)
    training.check_folder(tmp_path / "cache", "--cache-dir", writable=False)   # a read-only cache is read
    with pytest.raises(ValueError, match="refuses new files"):
        training.check_folder(tmp_path / "run", "--out")


def test_the_vit_memory_bound_is_from_below():
    """The weight part of the bound counts no more than the model's own matrices, and the tiny
    configuration is far inside it (so the check never refuses a run that fits)."""
    cfg = dict(image_size=32, patch_size=8, n_classes=4, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0,
               pe="learned", pool="cls", lam=0.0, lam_mode="identity", regime="free", dropout=0.0,
               drop_path=0.0, rope_base=100.0)
    model = train_vit.build_vit(cfg)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert train_vit.memory_lower_bound(cfg, 0) <= 16 * matrices
    assert train_vit.memory_lower_bound(cfg, 8) < 2 ** 20
    assert simulate.memory_lower_bound(8, 2) < 2 ** 20 and decomposition.memory_lower_bound(256) < 2 ** 25
    assert rope.demo_memory_lower_bound(64, 64) < 2 ** 20
