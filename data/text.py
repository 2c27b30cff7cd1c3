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
PATH.zip   a WikiText zip you have, recognised by its members (names below follow what it holds,
    never the file name alone): wikitext-103-v1.zip (wikitext-103/wiki.*.tokens) → wikitext103 and
    wikitext-2-v1.zip (wikitext-2/wiki.*.tokens) → wikitext2, word level as above, perplexity;
    wikitext-103-raw-v1.zip (wikitext-103-raw/wiki.{train,valid,test}.raw) → wikitext103-raw and
    wikitext-2-raw-v1.zip (wikitext-2-raw/wiki.*.raw) → wikitext2-raw: the raw releases, meant
    for character-level models, read byte level (256 symbols) with their own three splits, bpb.
PATH/      an extracted WikiText zip: a folder holding wiki.{train,valid,test}.tokens or .raw (or
    one sub-folder that does, as unzipping into PATH gives), read as its zip.
PATH/      Hugging Face's parquet layout (the Salesforce/wikitext dataset): <config>/{train,
    validation,test}-NNNNN-of-NNNNN.parquet, column "text", one row per line (a blank line " \n"
    stored as ""), PATH the config folder or the folder holding one config; wikitext-*-raw-v1 reads
    as the raw release, wikitext-*-v1 as the tokenised one.  Needs pyarrow (pip install pyarrow).
    Whether a release is WikiText-2 or -103: its own folder / member / config names, else the size
    of its training text (-103's is ~50× -2's; the validation and test articles are the same).
PATH       any local text file (.bz2 / .gz / .xz are decompressed; a .zip is recognised as one of
    the archives above by its members), byte level, split 90% / 5% / 5% contiguously.
Downloads go to the cache folder (train_lm.py --cache-dir, default ./cache), are verified before
they are renamed into place and verified again on every use (data/download.py).

Word ids of a tokenised WikiText are cached as <corpus>-<file>-<key>.npz, key = a hash of the
names, sizes and mtimes of the files read, and the npz holds the corpus name it was made for.

Scores: bits per byte/character = ℓ / ln 2 (enwik8, text8, pydocs, raw WikiText, local files);
perplexity = e^ℓ (tokenised WikiText-2 / -103), ℓ the mean loss in nats per token (Corpus.score).
"""
from __future__ import annotations

import array
import ast
import bz2
import gzip
import hashlib
import io
import lzma
import math
import os
import re
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
    """Recognise enwik8.zip, text8.zip and the WikiText zips (wikitext-{2,103}-v1.zip: tokenised,
    wikitext-{2,103}-raw-v1.zip: raw) by their members."""
    with _open_zip(path) as z:
        names = z.namelist()
        if "enwik8" in names:
            return byte_corpus("enwik8", _read_member(z, "enwik8", path), "bpc")
        if "text8" in names:
            return byte_corpus("text8", _read_member(z, "text8", path), "bpc")
    if _wiki_members(names, path):
        return load_wikitext(path, cache_dir)
    raise ValueError(f"{path} holds none of enwik8, text8 or WikiText's wiki.*.tokens / wiki.*.raw")


# -- WikiText: every release and layout ------------------------------------------------------------
# the splits as the files name them → the Corpus field; Hugging Face names the middle one "validation"
WIKI_SPLITS = {"train": "train", "valid": "val", "test": "test"}
HF_SPLITS = {"train": "train", "validation": "val", "test": "test"}
WIKI_EXTS = ("tokens", "raw")               # wiki.<split>.tokens: tokenised; wiki.<split>.raw: raw
WT103_MIN_TRAIN = 100_000_000               # bytes: WikiText-103's train split ≈ 539 MB, WikiText-2's ≈ 11 MB


@dataclass
class WikiSource:
    """One WikiText release in one layout: lines(split) yields its text lines, read(split) its
    bytes; stamp (file, size, mtime) of every file it reads is the cache key of the encoded ids."""
    name: str                  # wikitext2 | wikitext103 | wikitext2-raw | wikitext103-raw
    raw: bool
    where: Path
    lines: object              # split ("train" | "valid" | "test") → iterator of str
    read: object               # split → bytes
    stamp: list


def wikitext_name(hints: list, raw: bool, train_bytes: int) -> str:
    """The release's own names (zip member folders wikitext-2/, wikitext-103-raw/, Hugging Face
    configs wikitext-2-raw-v1, the zip's file name) say 2 or 103; when none does (a renamed
    folder), the size of the training split: WikiText-2 and -103 share their validation and test
    articles, but -103's training text is ~50× larger (≥ WT103_MIN_TRAIN bytes)."""
    for h in hints:
        if m := re.search(r"wikitext-?(2|103)(?!\d)", str(h).lower()):
            return f"wikitext{m.group(1)}" + ("-raw" if raw else "")
    return ("wikitext103" if train_bytes >= WT103_MIN_TRAIN else "wikitext2") + ("-raw" if raw else "")


def _wiki_members(names: list, path: Path) -> dict:
    """{split: member} of a zip's wiki.<split>.tokens or .raw ({} if it has neither); macOS's
    __MACOSX/._* shadow entries are not members."""
    found = {ext: {} for ext in WIKI_EXTS}
    for n in names:
        base = n.rsplit("/", 1)[-1]
        if n.startswith("__MACOSX/") or not base.startswith("wiki."):
            continue
        parts = base.split(".")
        if len(parts) == 3 and parts[1] in WIKI_SPLITS and parts[2] in WIKI_EXTS:
            found[parts[2]][parts[1]] = n
    have = [ext for ext in WIKI_EXTS if found[ext]]
    if len(have) > 1:
        raise ValueError(f"{path} holds both wiki.*.tokens and wiki.*.raw: pass one WikiText release at a time")
    if not have:
        return {}
    members = found[have[0]]
    for split in WIKI_SPLITS:
        if split not in members:
            raise ValueError(f"{path} has no wiki.{split}.{have[0]}: it is not a complete WikiText release")
    return members


def _zip_source(path: Path) -> WikiSource:
    with _open_zip(path) as z:
        members = _wiki_members(z.namelist(), path)
        if not members:
            raise ValueError(f"{path} has no wiki.train.tokens or wiki.train.raw: it is not a WikiText archive")
        train_bytes = z.getinfo(members["train"]).file_size
    raw = members["train"].endswith(".raw")
    dirs = [m.rsplit("/", 1)[0] for m in members.values() if "/" in m]

    def lines(split):
        with _open_zip(path) as z:
            yield from _text_lines(lambda: z.open(members[split]), f"{path}: {members[split]}")

    def read(split):
        with _open_zip(path) as z:
            return _read_member(z, members[split], path)
    st = path.stat()
    return WikiSource(wikitext_name(dirs + [path.name], raw, train_bytes), raw, path, lines, read,
                      [(path.name, st.st_size, st.st_mtime_ns)])


def _text_lines(opener, where: str):
    """The lines of a UTF-8 text stream (universal newlines); a corrupt stream is one sentence."""
    try:
        with opener() as raw:
            yield from io.TextIOWrapper(raw, encoding="utf-8")
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{where} is corrupt or truncated: reading it failed ({e})") from None


def _folder_holding(path: Path, has) -> Path | None:
    """`path` itself if has(path), else its one sub-folder that has (an archive extracted into
    PATH gives PATH/wikitext-103/); two or more such sub-folders are an error naming them."""
    if has(path):
        return path
    subs = sorted(d for d in path.iterdir() if d.is_dir() and has(d))
    if len(subs) > 1:
        raise ValueError(f"{path} holds several WikiText releases ({', '.join(d.name for d in subs)}): "
                         f"pass one of these folders as --data")
    return subs[0] if subs else None


def _wiki_files(folder: Path) -> dict:
    return {ext: {s: folder / f"wiki.{s}.{ext}" for s in WIKI_SPLITS if (folder / f"wiki.{s}.{ext}").is_file()}
            for ext in WIKI_EXTS}


def _folder_source(folder: Path, given: Path) -> WikiSource:
    """An extracted WikiText zip: wiki.{train,valid,test}.tokens (tokenised) or .raw (raw)."""
    found = _wiki_files(folder)
    have = [ext for ext in WIKI_EXTS if found[ext]]
    if len(have) > 1:
        raise ValueError(f"{folder} holds both wiki.*.tokens and wiki.*.raw: pass one WikiText release at a time")
    ext = have[0]
    files = found[ext]
    for split in WIKI_SPLITS:
        if split not in files:
            raise ValueError(f"{folder} has no wiki.{split}.{ext}: an extracted WikiText release holds "
                             f"wiki.train.{ext}, wiki.valid.{ext} and wiki.test.{ext}")

    def read(split):
        return files[split].read_bytes()
    stats = {s: f.stat() for s, f in files.items()}
    return WikiSource(wikitext_name([folder.name, given.name], ext == "raw", stats["train"].st_size), ext == "raw",
                      folder, lambda split: _text_lines(lambda: open(files[split], "rb"), str(files[split])), read,
                      [(f.name, stats[s].st_size, stats[s].st_mtime_ns) for s, f in files.items()])


def _parquet_files(folder: Path) -> dict:
    """{split: [shards in order]} of Hugging Face's parquet layout: <split>-00000-of-0000N.parquet."""
    out = {}
    for f in sorted(folder.glob("*.parquet")):
        split = f.name.split("-", 1)[0]
        if split in HF_SPLITS:
            out.setdefault(split, []).append(f)
    return out


def _parquet_rows(files: list, folder: Path) -> list:
    """The "text" column of the shards, in order: one row per line of the original file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{folder} holds Hugging Face parquet files: reading them needs pyarrow, which "
                         f"is not installed (pip install pyarrow)") from None
    import pyarrow as pa
    rows = []
    for f in files:
        try:
            rows.extend(pq.read_table(f, columns=["text"]).column("text").to_pylist())
        except (pa.lib.ArrowException, OSError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{f} is not a readable parquet file with a 'text' column ({msg})") from None
    # Hugging Face's script stored a blank line (" \n" in WikiText) as "": put it back, so the lines
    # (and the bytes) are exactly those of the zip release
    return [r if r else " \n" for r in rows]


def _parquet_source(folder: Path, given: Path) -> WikiSource:
    """Hugging Face's layout (the Salesforce/wikitext dataset): <config>/{train,validation,test}-
    *.parquet, column "text", a row per line.  Config wikitext-103-raw-v1 / wikitext-2-raw-v1 is
    the raw release, wikitext-103-v1 / wikitext-2-v1 the tokenised one; a folder whose name says
    neither is raw unless its training text holds the tokenised release's <unk>."""
    shards = _parquet_files(folder)
    for split in HF_SPLITS:
        if split not in shards:
            raise ValueError(f"{folder} has no {split}-*.parquet: Hugging Face's WikiText layout holds "
                             f"train-*, validation-* and test-*.parquet")
    cache = {}

    def rows(split):                                    # file split name → the parquet split's rows
        hf = "validation" if split == "valid" else split
        if hf not in cache:
            cache[hf] = _parquet_rows(shards[hf], folder)
        return cache[hf]
    hints = [folder.name, given.name]
    named = next((h for h in hints if re.search(r"wikitext-?(2|103)(?!\d)", h.lower())), None)
    raw = "raw" in named.lower() if named else not any("<unk>" in r for r in rows("train"))
    files = [f for fs in shards.values() for f in fs]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    train_bytes = sum(f.stat().st_size for f in shards["train"])
    return WikiSource(wikitext_name(hints, raw, train_bytes), raw, folder, lambda split: iter(rows(split)),
                      lambda split: "".join(rows(split)).encode("utf-8"), stats)


def wikitext_source(path: Path) -> WikiSource | None:
    """The WikiText release at `path` (a zip or a folder), or None for a folder holding none."""
    if not path.is_dir():
        return _zip_source(path)
    folder = _folder_holding(path, lambda d: any(_wiki_files(d)[ext] for ext in WIKI_EXTS))
    if folder is not None:
        return _folder_source(folder, path)
    folder = _folder_holding(path, lambda d: bool(_parquet_files(d)))
    if folder is not None:
        return _parquet_source(folder, path)
    return None


def load_wikitext(path: Path, cache_dir: Path | None = None, src: WikiSource | None = None) -> Corpus:
    """A WikiText release (zip or folder), named after what it holds (wikitext_name).
    Raw releases (wiki.*.raw, for character / byte-level models): byte level, their own splits,
    bits per byte.  Tokenised releases (wiki.*.tokens): word level, vocabulary = training words
    sorted by count (ties: first seen), the order the adaptive softmax's frequency cutoffs
    assume; <unk> is already a word of the corpus (added if absent, and used for words the
    training split lacks); <eos> ends every line; perplexity.  Encoded ids are cached under the
    corpus name and the files' names, sizes and mtimes, so one release's ids never stand in for
    another's."""
    src = src or wikitext_source(path)
    if src is None:
        raise ValueError(f"{path} holds no WikiText release")
    if src.raw:
        # bytes of the UTF-8 text: 256 symbols, its own train / valid / test files
        parts = {key: np.frombuffer(src.read(split), dtype=np.uint8) for split, key in WIKI_SPLITS.items()}
        for key, arr in parts.items():
            if not len(arr):
                raise ValueError(f"the {key} split of {src.where} ({src.name}) is empty")
        return Corpus(src.name, parts["train"], parts["val"], parts["test"], 256, "bpb")
    key = hashlib.sha1(repr(src.stamp).encode("utf-8")).hexdigest()[:12]
    cached = (cache_dir / f"{src.name}-{src.where.stem}-{key}.npz") if cache_dir else None
    if cached is not None and cached.exists():
        try:
            with np.load(cached) as z:
                if bytes(z["name"]).decode("utf-8") == src.name:
                    itos = bytes(z["vocab"]).decode("utf-8").split("\n")
                    return Corpus(src.name, z["train"], z["val"], z["test"], len(itos), "ppl", itos)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
            pass                                       # unreadable or another corpus's: encode again
    counts = Counter()
    for line in tqdm(src.lines("train"), desc=f"counting words of {src.name}", unit=" lines"):
        counts.update(line.split() + ["<eos>"])        # the words of a line, then <eos> (empty: just <eos>)
    itos = [w for w, _ in counts.most_common()]
    if "<unk>" not in counts:
        itos.append("<unk>")
    stoi = {w: i for i, w in enumerate(itos)}
    unk = stoi["<unk>"]
    out = {}
    for split, field in WIKI_SPLITS.items():
        ids = array.array("i")                         # 4 bytes a word: ~0.4 GB for WikiText-103
        for line in src.lines(split):
            ids.extend(stoi.get(w, unk) for w in line.split() + ["<eos>"])
        out[field] = np.frombuffer(ids, dtype=np.int32).copy()
    if cached is not None:
        vocab = np.frombuffer("\n".join(itos).encode("utf-8"), dtype=np.uint8)
        name = np.frombuffer(src.name.encode("utf-8"), dtype=np.uint8)
        training.atomic_write(cached, lambda tmp: np.savez(open(tmp, "wb"), vocab=vocab, name=name, **out))
    return Corpus(src.name, out["train"], out["val"], out["test"], len(itos), "ppl", itos)


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
        hint = (": of WikiText only wikitext103 (tokenised) is downloaded, so pass WikiText-2 or a raw "
                "release as its zip or folder, e.g. --data wikitext-2-raw-v1.zip"
                if data.lower().startswith("wikitext") else "")
        raise ValueError(f"--data {data!r} is neither a known corpus ({', '.join(KNOWN)}) nor an existing file{hint}")
    if path.is_dir():
        # an extracted WikiText zip (wiki.*.tokens / wiki.*.raw) or Hugging Face's parquet files
        if (src := wikitext_source(path)) is None:
            raise ValueError(f"--data {data} is a folder without a WikiText release: a folder must hold "
                             f"wiki.{{train,valid,test}}.tokens or .raw, or Hugging Face's "
                             f"{{train,validation,test}}-*.parquet (else pass a text file or an archive)")
        return load_wikitext(path, cache_dir, src)
    if path.suffix == ".zip":
        return load_zip(path, cache_dir)
    raw = read_text_file(path)
    warning = binary_warning(raw, str(path))
    if warning:
        print(warning, file=sys.stderr)
    return byte_corpus(path.name, raw)


def uses_cache(data: str) -> bool:
    """Whether --data `data` reads or writes --cache-dir: the embedded corpus, the downloads, and
    the encoded word ids of a WikiText zip or folder (a plain text file is not cached)."""
    return data in KNOWN or str(data).endswith(".zip") or Path(data).is_dir()


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
