"""data/text.py -- the text corpora of train_lm.py and its batching: token ids in three splits
(train / validation / test), the score each corpus is reported in, and the random training windows.

Corpora (train_lm.py --data) and where they come from
-----------------------------------------------------
pydocs (default, no download)  The English prose that ships with Python itself: the Python
    Language Reference topics that `help()` shows (pydoc_data.topics, ~0.47 MB) followed by the
    docstrings of the standard library's pure-Python modules (~1.5 MB, parsed with `ast`; test
    packages and site-packages skipped); ~2.0 MB of UTF-8, byte level (256 symbols).  It depends on
    the Python version (the numbers in the README are for CPython 3.11.7).  Split by document:
    of every 20 consecutive documents the 19th goes to validation and the 20th to test.
enwik8     http://mattmahoney.net/dc/enwik8.zip  (sha256 547994d9…34bc, 36,445,475 bytes; the
    checksum published in Hugging Face's dataset record): first 10⁸ bytes of a 2006 Wikipedia
    XML dump, byte level, split 90M / 5M / 5M (train / validation / test), bits per character.
text8      http://mattmahoney.net/dc/text8.zip  (sha256 a6640522…5232, 31,344,016 bytes; the site
    publishes no digest: this is the one independent public projects pin): 10⁸
    characters of cleaned Wikipedia (a-z and space), split 90M / 5M / 5M, bits per character.
wikitext103  wikitext-103-v1.zip, the TOKENISED word-level release (not the -raw one), from the
    authors' S3 bucket (mirror: wikitext.smerity.com), md5 9ddaacaf6af0710eda8c456decff7832 (as
    in torchtext): its own train/valid/test files; vocabulary = the training words by frequency
    plus <eos> at every line end (Transformer-XL's convention, 267,735 symbols); perplexity.
PATH       any local text file (.bz2 / .gz / .xz are decompressed; a .zip is recognised as one of
    the archives above by its members), byte level, split 90% / 5% / 5% contiguously.
Downloads go to the cache folder (train_lm.py --cache-dir, default ./cache), are verified before
they are renamed into place and verified again on every use (data/download.py).

Scores: bits per byte/character = ℓ / ln 2 (enwik8, text8, pydocs, local files); perplexity = e^ℓ
(WikiText-103), ℓ the mean loss in nats per token (Corpus.score).
"""
from __future__ import annotations

import array
import ast
import bz2
import gzip
import io
import lzma
import math
import os
import sys
import sysconfig
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import training
from data import download as data_download


@dataclass
class Corpus:
    name: str
    train: np.ndarray          # token ids (uint8 for bytes, int32 for words)
    val: np.ndarray
    test: np.ndarray
    vocab_size: int
    metric: str                # "bpc" | "bpb" (bits per character / byte) | "ppl"
    itos: list | None = None   # words, for word-level data

    def score(self, loss_nats: float) -> float:
        """bits per symbol = ℓ / ln 2,  perplexity = e^ℓ."""
        return math.exp(loss_nats) if self.metric == "ppl" else loss_nats / math.log(2)


SOURCES = {
    "enwik8": dict(urls=["http://mattmahoney.net/dc/enwik8.zip"], file="enwik8.zip", size=36445475,
                   sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),
    # the site publishes no digest; this SHA-256 of text8.zip is the one independent public
    # projects pin (beside the extracted member's, 6e890197…dca7), so a substituted or truncated
    # file is refused, not only one of the wrong size
    "text8": dict(urls=["http://mattmahoney.net/dc/text8.zip"], file="text8.zip", size=31344016,
                  sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232"),
    "wikitext103": dict(urls=["https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
                              "https://wikitext.smerity.com/wikitext-103-v1.zip"],
                        file="wikitext-103-v1.zip", md5="9ddaacaf6af0710eda8c456decff7832"),
}
KNOWN = ("pydocs",) + tuple(SOURCES)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def python_docs(cache_dir: Path | None = None) -> list[str]:
    """The embedded corpus as a list of documents: each `help()` topic of the Language Reference
    (sorted by name), then one document per pure-Python stdlib module holding its module, class
    and function docstrings (files in sorted path order).  Cached as text after the first build."""
    ver = ".".join(map(str, sys.version_info[:3]))
    cached = cache_dir / f"pydocs-py{ver}.txt" if cache_dir else None
    sep = "\n\x1e\n"                                   # ASCII record separator between documents
    if cached is not None and cached.exists():
        return cached.read_text(encoding="utf-8").split(sep)
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("this Python build lacks the standard library's pydoc_data, which the "
                         "embedded corpus needs: pass --data with a text file instead") from None
    docs = [topics[k] for k in sorted(topics)]
    std = sysconfig.get_paths()["stdlib"]
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for root, dirs, files in os.walk(std):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for f in sorted(files):
            if not f.endswith(".py") or f.startswith("test_"):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(Path(root, f).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            text = "\n\n".join(s for n in ast.walk(tree) if isinstance(n, kinds)
                               if (s := ast.get_docstring(n)))
            if text:
                docs.append(text)
    if cached is not None:
        training.atomic_write(cached, lambda tmp: tmp.write_text(sep.join(docs), encoding="utf-8"))
    return docs


def split_90_5_5(data: np.ndarray):
    """Contiguous split: train = all but the last 10%, then 5% validation, 5% test (for enwik8's
    and text8's 10⁸ symbols exactly the standard 90M / 5M / 5M)."""
    n5 = len(data) // 20
    return data[: len(data) - 2 * n5], data[len(data) - 2 * n5: len(data) - n5], data[len(data) - n5:]


def byte_corpus(name: str, raw: bytes, metric: str = "bpb") -> Corpus:
    if not raw:
        raise ValueError(f"the corpus {name} is empty")
    tr, va, te = split_90_5_5(np.frombuffer(raw, dtype=np.uint8))
    return Corpus(name, tr, va, te, 256, metric)


def pydocs_corpus(cache_dir: Path | None) -> Corpus:
    docs = python_docs(cache_dir)
    parts = {"train": [], "val": [], "test": []}
    for i, doc in enumerate(docs):
        # of every 20 documents: the 19th → validation, the 20th → test, the rest → train
        parts["val" if i % 20 == 18 else "test" if i % 20 == 19 else "train"].append(doc)
    arr = {k: np.frombuffer("\n\n".join(v).encode("utf-8"), dtype=np.uint8) for k, v in parts.items()}
    return Corpus("pydocs", arr["train"], arr["val"], arr["test"], 256, "bpb")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable zip archive ({e}): it is corrupt or truncated, "
                         f"delete it and download it again") from None


def _read_member(z: zipfile.ZipFile, member: str, path: Path) -> bytes:
    try:
        return z.read(member)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is corrupt or truncated: reading {member} failed ({e})") from None


def load_zip(path: Path, cache_dir: Path | None = None) -> Corpus:
    """Recognise enwik8.zip, text8.zip and wikitext-103(-v1).zip by their members."""
    with _open_zip(path) as z:
        names = z.namelist()
        if "enwik8" in names:
            return byte_corpus("enwik8", _read_member(z, "enwik8", path), "bpc")
        if "text8" in names:
            return byte_corpus("text8", _read_member(z, "text8", path), "bpc")
    if any(n.endswith("wiki.train.tokens") for n in names):
        return load_wikitext(path, cache_dir)
    raise ValueError(f"{path} holds none of enwik8, text8 or wikitext-103/wiki.*.tokens")


def _wikitext_lines(z: zipfile.ZipFile, member: str, path: Path):
    """Words of each line, with <eos> at the end (empty lines give just <eos>)."""
    try:
        with z.open(member) as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8"):
                yield line.split() + ["<eos>"]
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{path} is corrupt or truncated: reading {member} failed ({e})") from None


def load_wikitext(path: Path, cache_dir: Path | None = None) -> Corpus:
    """Word-level WikiText: vocabulary = training words sorted by count (ties: first seen), the
    order the adaptive softmax's frequency cutoffs assume; <unk> is already a word of the corpus
    (added if absent, and used for words the training split lacks).  Encoded ids are cached."""
    st = path.stat()
    cached = (cache_dir / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}.npz") if cache_dir else None
    if cached is not None and cached.exists():
        z = np.load(cached)
        itos = bytes(z["vocab"]).decode("utf-8").split("\n")
        return Corpus("wikitext103", z["train"], z["val"], z["test"], len(itos), "ppl", itos)
    with _open_zip(path) as z:
        member = {s: next((n for n in z.namelist() if n.endswith(f"wiki.{s}.tokens")), None)
                  for s in ("train", "valid", "test")}
        for s, m in member.items():
            if m is None:
                raise ValueError(f"{path} has no wiki.{s}.tokens: it is not a WikiText archive")
        counts = Counter()
        for words in tqdm(_wikitext_lines(z, member["train"], path), desc="counting words", unit=" lines"):
            counts.update(words)
        itos = [w for w, _ in counts.most_common()]
        if "<unk>" not in counts:
            itos.append("<unk>")
        stoi = {w: i for i, w in enumerate(itos)}
        unk = stoi["<unk>"]
        out = {}
        for split, key in (("train", "train"), ("valid", "val"), ("test", "test")):
            ids = array.array("i")                     # 4 bytes a word: ~0.4 GB for WikiText-103
            for words in _wikitext_lines(z, member[split], path):
                ids.extend(stoi.get(w, unk) for w in words)
            out[key] = np.frombuffer(ids, dtype=np.int32).copy()
    if cached is not None:
        vocab = np.frombuffer("\n".join(itos).encode("utf-8"), dtype=np.uint8)
        training.atomic_write(cached, lambda tmp: np.savez(open(tmp, "wb"), vocab=vocab, **out))
    return Corpus("wikitext103", out["train"], out["val"], out["test"], len(itos), "ppl", itos)


def read_text_file(path: Path) -> bytes:
    """Bytes of a local file, decompressing .bz2 / .gz / .xz."""
    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path} could not be decompressed ({e}): it is corrupt or truncated") from None


def load_corpus(data: str, cache_dir: Path) -> Corpus:
    """--data: a known name (downloaded and verified into cache_dir) or a local file."""
    if data == "pydocs":
        return pydocs_corpus(cache_dir)
    if data in SOURCES:
        src = SOURCES[data]
        path = data_download.download(src["urls"], cache_dir / src["file"], sha256=src.get("sha256"),
                                 md5=src.get("md5"), size=src.get("size"))
        return load_zip(path, cache_dir)
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {data!r} is neither a known corpus ({', '.join(KNOWN)}) nor an existing file")
    if path.is_dir():
        raise ValueError(f"--data {data} is a folder: pass a text file or an archive")
    if path.suffix == ".zip":
        return load_zip(path, cache_dir)
    raw = read_text_file(path)
    warning = binary_warning(raw, str(path))
    if warning:
        print(warning, file=sys.stderr)
    return byte_corpus(path.name, raw)


def binary_warning(raw: bytes, name: str) -> str:
    """A sentence when `raw` does not look like text — NUL bytes, or most of its first 64 KiB not
    valid UTF-8 — since a byte-level LM trains on anything without a word; "" for text."""
    head = raw[:65536]
    if not head:
        return ""
    nul = head.count(0) / len(head)
    bad = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    if nul > 0.001 or bad / len(head) > 0.05:
        return (f"warning: {name} does not look like text ({100 * nul:.1f}% NUL bytes, {100 * bad / len(head):.1f}% "
                "not UTF-8 in its first 64 KiB); training on its bytes anyway")
    return ""


def check_corpus(c: Corpus, seq_len: int) -> None:
    """Every split must hold at least one window of seq_len + 1 tokens."""
    for split in ("train", "val", "test"):
        n = len(getattr(c, split))
        if n < seq_len + 2:
            need = 20 * (seq_len + 2)
            raise ValueError(f"the corpus {c.name} is too short: its {split} split has {n} tokens but "
                             f"--seq-len {seq_len} needs at least {seq_len + 2} (about {need} tokens in all)")


def batch_fn_for(tokens: np.ndarray, *, seq_len: int, global_batch: int, micro: int,
                 rt: training.Runtime, seed: int):
    """Random windows, a pure function of (seed, step): all processes draw the same global batch
    of start offsets and take their own rows, so 1 and W processes see the same data."""
    span = np.arange(seq_len + 1)

    def batch_fn(step: int, m: int):
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=global_batch, endpoint=True)
        # micro-batch m of rank r: rows (m W + r) b … (m W + r + 1) b − 1
        lo = (m * rt.world_size + rt.rank) * micro
        chunk = torch.from_numpy(tokens[starts[lo: lo + micro, None] + span].astype(np.int64))
        chunk = chunk.to(rt.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]
    return batch_fn
