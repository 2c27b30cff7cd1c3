"""Downloads for the data pipelines: fetch a file once into the cache, verified by size and digest.

The real datasets (enwik8, text8, WikiText-103, CIFAR-10) come from their canonical sources with the
published checksum; a failed or interrupted download leaves nothing behind, and offline the error
says where to put the file by hand. The tests exercise this on a local HTTP server.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

import training


def file_digest(path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path, *, sha256: str | None = None, md5: str | None = None, size: int | None = None) -> None:
    """ValueError unless the file has the expected size and digest (those that are given)."""
    path = Path(path)
    if size is not None and path.stat().st_size != size:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, not the published {size}: "
                         f"it is truncated or another file (delete it and download again)")
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want and file_digest(path, algo) != want:
            raise ValueError(f"{path} does not match its published {algo} checksum "
                             f"(delete it and download again)")


def download(urls, dest, *, sha256: str | None = None, md5: str | None = None, size: int | None = None,
             timeout: float = 60.0) -> Path:
    """Fetch a file into the cache once, with a progress bar, verified before it is renamed into
    place (a failed or interrupted download leaves nothing at `dest`).  A cached file is verified
    again on every use.  Offline: one sentence saying where to put the file by hand."""
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    if dest.exists():
        verify_file(dest, sha256=sha256, md5=md5, size=size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".part{os.getpid()}")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or size
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            continue
        except BaseException:           # Ctrl-C / SIGTERM mid-download: no .partPID left behind
            part.unlink(missing_ok=True)
            raise
        try:
            verify_file(part, sha256=sha256, md5=md5, size=size)
        except ValueError:
            part.unlink(missing_ok=True)
            raise ValueError(f"the file downloaded from {url} does not match its published checksum "
                             f"or size, so it was discarded") from None
        training.fsync(part)            # on disk before the name points at it
        os.replace(part, dest)
        return dest
    raise ValueError(f"could not download {dest.name} ({'; '.join(errors)}); if this machine is "
                     f"offline, fetch {urls[0]} elsewhere and put it at {dest}")
