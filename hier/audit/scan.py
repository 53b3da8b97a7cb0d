"""Reading a dataset for the audit: the files the reader left out, and every kept photo's bytes,
size and brightness."""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from hier.data import OK, ImageSet, check_images, pil_rgb, walk_files
from hier.data.exclude import photo_path
from hier.errors import HierError


def rejected_files(data: Path, images: ImageSet, layout: str) -> list[dict]:
    """The files of the layout the reader did not keep, each with why (``check_image``'s reason): the
    reader only counts them."""
    if layout == "aihub":
        candidates = [p for p in walk_files(data) if p.suffix.lower() != ".json" and len(p.relative_to(data).parts) >= 4]
    else:
        candidates = sorted(p for d in data.iterdir() if d.is_dir() and not d.name.startswith(".")
                            for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = {photo_path(p) for p in images.paths}
    rest = [p for p in candidates if p not in kept]
    return [{"path": p.relative_to(data).as_posix(), "reason": s if s != OK else "left out by the reader"}
            for p, s in zip(rest, check_images(rest))]


def _read_one(path: Path) -> tuple[str, int, int, int, float, str]:
    """(MD5, bytes, upright width, height, mean luminance 0..255, perceptual hash) from one read of the
    file. The pHash (64 bits, hex) stays within a few bits for a copy resized or re-encoded."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):      # EXIF orientation: stored sideways
            w, h = h, w
        im.draft("RGB", (64, 64))                           # JPEG decoded at 1/8: brightness and pHash need no more
        rgb = pil_rgb(im)
    phash = str(imagehash.phash(Image.fromarray(rgb)))
    return (hashlib.md5(raw).hexdigest(), len(raw), w, h, float((rgb.astype(np.float32) @ [0.299, 0.587, 0.114]).mean()),
            phash)


def file_table(data: Path, images: ImageSet, progress=None) -> pd.DataFrame:
    """One row per kept photo: path (relative to ``data``), class, md5, bytes, width, height, brightness, phash."""
    paths = [photo_path(p) for p in images.paths]
    task = progress.add_task("read", total=len(paths), info="") if progress else None

    def one(p: Path):
        try:
            row = _read_one(p)
        except (OSError, ValueError, SyntaxError) as e:
            raise HierError(f"cannot read {p} ({getattr(e, 'strerror', None) or e}); did it change during the audit?") \
                from None
        if progress:
            progress.advance(task)
        return row

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(one, paths))
    table = pd.DataFrame(rows, columns=["md5", "bytes", "width", "height", "brightness", "phash"])
    table.insert(0, "class", images.labels)
    table.insert(0, "path", [p.relative_to(data).as_posix() for p in paths])
    return table
