"""Crash-safe file writes and checksums shared by the cache, the model conversion, training and evaluation, and the
gzip-compressed files that a run's record keeps its evaluation items in (:func:`stored_file`, :func:`open_stored`,
:func:`compress_file`)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

GZIP_SUFFIX = ".gz"
"""The suffix of a gzip-compressed file: ``<name>.gz`` holds the content of ``<name>``."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):  # not supported everywhere (Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, tmp_prefix: str = ".tmp-") -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{tmp_prefix}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts as CSV, atomically; the header is the union of their keys in first-seen order."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["empty"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): a fingerprint of plain data."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored_file(path: str | os.PathLike) -> Path:
    """The file that holds ``path``'s content: ``path`` itself, else its gzip-compressed form ``<path>.gz`` (a run's
    record names its evaluation items ``<set>.generations.jsonl`` and keeps them as ``<set>.generations.jsonl.gz``);
    ``path`` when neither exists."""
    path = Path(path)
    if path.is_file() or path.name.endswith(GZIP_SUFFIX):
        return path
    packed = path.with_name(path.name + GZIP_SUFFIX)
    return packed if packed.is_file() else path


def open_stored(path: str | os.PathLike) -> IO[bytes]:
    """:func:`stored_file` of ``path`` opened for reading bytes, a ``.gz`` one decompressed as it is read."""
    found = stored_file(path)
    return gzip.open(found, "rb") if found.name.endswith(GZIP_SUFFIX) else open(found, "rb")


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzip-compressed, the same bytes for the same data: level 9, no file name, modification time 0."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as fh:
        fh.write(data)
    return buf.getvalue()


def compress_file(path: str | os.PathLike) -> Path:
    """Replace ``path`` by its gzip-compressed ``<path>.gz`` (:func:`gzip_bytes`, written atomically before
    ``path`` is removed, so one of the two always holds the content); returns the ``.gz`` path."""
    path = Path(path)
    packed = path.with_name(path.name + GZIP_SUFFIX)
    atomic_write_bytes(packed, gzip_bytes(path.read_bytes()))
    path.unlink()
    return packed
