"""The pq kind's re-rank vectors on disk (``VECTORS``, float16, one row per listing row): memory-mapped
for reading a few rows a query, warmed in the background, read whole for an edit or a save, and tied to
their listings by the digest of their ids."""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from pathlib import Path

import numpy as np


def mapped_rows(path: Path) -> np.ndarray:
    """A saved ``.npy`` array memory-mapped for reading a few rows at a time: the map is advised
    ``MADV_RANDOM``, so a fault reads its page, not the 8 MB around it a sequential reader wants (with
    that readahead a query's few hundred rows from a cold cache read most of a large gallery's file:
    docs/benchmarks/gallery.md, from disk, cold). ``prefetch`` warms the whole file instead."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"{path.name}: .npy format {version} is not one numpy writes")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if dtype.hasobject or os.fstat(f.fileno()).st_size < offset + int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{path.name} is cut or holds objects")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


def prefetch(path: Path) -> None:
    """Have the kernel read ``path`` into the page cache, in a background thread (``load`` returns at
    once). A pq shard's memory-mapped vectors are read at random, a few hundred rows a query: from a
    cold cache each row is a disk read (docs/benchmarks/gallery.md, from disk, cold), where one
    sequential pass reads the whole file at the disk's speed. ``POSIX_FADV_WILLNEED`` over the whole
    file reads only its first 8 MB on Linux, so it is asked chunk by chunk. Not for a file over half
    the machine's memory (it would evict its own pages and everyone else's); a no-op where the call
    does not exist (Windows, macOS)."""
    if hasattr(os, "posix_fadvise") and path.stat().st_size < memory_bytes() / 2:
        threading.Thread(target=_read_ahead, args=(path,), name=f"prefetch {path.name}", daemon=True).start()


def memory_bytes() -> float:
    """The machine's physical memory (infinite where the system does not say)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return float("inf")


def whole(rows: np.ndarray) -> np.ndarray:
    """``rows`` about to be read from end to end (an edit or a save copies a shard's vectors): a
    ``mapped_rows`` map is advised sequential first, or a cold file would be read a page per fault
    (many times slower: docs/benchmarks/gallery.md, from disk, cold)."""
    if isinstance(rows.base, mmap.mmap) and hasattr(mmap, "MADV_SEQUENTIAL"):
        rows.base.madvise(mmap.MADV_SEQUENTIAL)
    return rows


def _read_ahead(path: Path, chunk: int = 8 << 20) -> None:
    with contextlib.suppress(OSError):        # a file replaced or removed meanwhile: nothing to warm
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, os.fstat(fd).st_size, chunk):
                os.posix_fadvise(fd, offset, chunk, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:            # np.save(path) would add ".npy" to a temporary name
        np.save(f, np.ascontiguousarray(array))


def ids_digest(ids: np.ndarray) -> str:
    """What ties a shard's ``VECTORS`` to its listings (gallery.json records it): the digest of the ids
    its rows belong to, in order."""
    return hashlib.md5(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()
