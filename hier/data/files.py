"""Sets of photos on disk: folders searched (symlinks followed once), a test CSV, every file checked
once, up front, with what was skipped counted (``ImageSet``), so an epoch never dies on one bad photo.

Layouts: folder-per-class (``root/<class>/*.jpg``, as Hecto train and Stanford dev) and a test CSV
(``ID,img_path`` with paths relative to the CSV).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from hier.data.images import NOT_IMAGE, OK, TOO_LARGE, UNREADABLE, check_images
from hier.data.tables import first_repeat, read_table
from hier.errors import HierError
from hier.taxonomy import nfc

REPEATED, DANGLING, REVISITED = "repeated", "dangling symlink", "folder reached twice"
_SKIPPED = {UNREADABLE: "unreadable image(s)", NOT_IMAGE: "non-image file(s)",
            TOO_LARGE: f"image(s) over PIL's {Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit",
            REPEATED: "repeat(s) of a file already given", DANGLING: "dangling symlink(s)",
            REVISITED: "symlinked folder(s) already searched (a loop or a second link)"}


@dataclass
class ImageSet:
    """Image paths with optional class names, plus what was skipped while scanning (by reason)."""

    paths: list[Path]
    labels: list[str] | None = None
    ids: list[str] | None = None
    skipped: Counter = field(default_factory=Counter)

    def skipped_message(self) -> str | None:
        """``skipped 2 unreadable image(s) and 1 non-image file(s)``; a reader's own reasons as they are."""
        parts = [f"{n} {_SKIPPED.get(why, why)}" for why, n in sorted(
            self.skipped.items(), key=lambda kv: list(_SKIPPED).index(kv[0]) if kv[0] in _SKIPPED else 99) if n]
        return f"skipped {' and '.join(parts)}" if parts else None


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _file_key(path) -> tuple[int, int]:
    """What makes two paths one file or folder: device and inode, symlinks followed."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def iter_files(root: str | Path, skipped: Counter | None = None) -> Iterator[Path]:
    """Every file below ``root``, following symlinked folders (``Path.rglob`` does not, on Python 3.11,
    so a folder of symlinked class folders looked empty), each real folder searched once: a symlink to
    an ancestor or a second link to a folder already searched is skipped, so no tree loops. Hidden files
    and folders (``.cache``, ``.DS_Store``) are left out. Paths stay below ``root`` as spelled (not
    resolved), so ``relative_to(root)`` names them. Folders are walked in sorted order; ``skipped``
    counts dangling symlinks and folders reached twice."""
    root = Path(root)
    skipped = Counter() if skipped is None else skipped
    seen = {_file_key(root)}
    for top, dirs, names in os.walk(root, followlinks=True):
        kept = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            try:
                key = _file_key(os.path.join(top, d))
            except OSError:
                continue
            if key in seen:
                skipped[REVISITED] += 1
                continue
            seen.add(key)
            kept.append(d)
        dirs[:] = kept                          # os.walk descends into these only
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(top, name)
            if path.is_file():
                yield path
            elif path.is_symlink() and not path.exists():
                skipped[DANGLING] += 1


def walk_files(root: str | Path, skipped: Counter | None = None) -> list[Path]:
    """``iter_files`` sorted (the order ``Path.rglob`` + ``sorted`` gave)."""
    return sorted(iter_files(root, skipped))


def scan_folder(root: str | Path) -> ImageSet:
    """Folder-per-class layout -> checked image paths and class names. Folder names are read in NFC, so
    a folder copied from macOS (NFD) is the same class as the taxonomy's spelling, and NFC/NFD twin
    folders are one class."""
    root = Path(root)
    if not root.is_dir():
        raise HierError(f"data folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise HierError(f"{root} has no class folders (expected {root}/<class>/*.jpg)")
    paths, labels = [], []
    for d in class_dirs:
        files = _files(d)
        paths += files
        labels += [nfc(d.name)] * len(files)
    status = check_images(paths)
    kept = ImageSet([p for p, s in zip(paths, status) if s == OK], [c for c, s in zip(labels, status) if s == OK],
                    skipped=Counter(s for s in status if s != OK))
    empty = sorted({nfc(d.name) for d in class_dirs} - set(kept.labels))
    if empty:
        raise HierError(f"class folder {root / empty[0]} has no readable images"
                        + (f" ({len(empty)} such folders)" if len(empty) > 1 else ""))
    return kept


def require_cells(table: pd.DataFrame, columns: list[str], where: str | Path) -> None:
    """Refuse a CSV with an empty cell in a column that must be filled."""
    for col in columns:
        blank = table[col].isna() | (table[col].astype(str).str.strip() == "")
        if blank.any():
            raise HierError(f"{where}: row {int(np.argmax(blank.to_numpy())) + 2} has an empty {col!r} cell")


def read_test_csv(csv: str | Path) -> ImageSet:
    """``ID,img_path`` CSV (paths relative to the CSV's folder) -> checked image paths and IDs."""
    csv = Path(csv)
    table = read_table(csv, "test CSV", ["ID", "img_path"])
    require_cells(table, ["ID", "img_path"], csv)
    repeat = first_repeat(table["ID"])
    if repeat:
        raise HierError(f"{csv} lists ID {repeat[0]!r} twice (rows {repeat[1] + 2} and {repeat[2] + 2})")
    paths = [(csv.parent / p).resolve() for p in table["img_path"]]
    refuse_listed(paths, csv)
    return ImageSet(paths, ids=table["ID"].tolist())


def refuse_listed(paths: list[Path], listing: Path) -> None:
    """Every photo a CSV lists must exist and be a usable image: one error line otherwise."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise HierError(f"{len(missing)} image(s) listed in {listing} do not exist, e.g. {missing[0]}")
    refuse_bad(paths, f"listed in {listing}")


def refuse_bad(paths: list[Path], where: str = "given") -> None:
    """One error line naming the first path that is not a usable image, and why."""
    if not paths:
        return
    status = check_images(paths)
    bad = [(p, s) for p, s in zip(paths, status) if s != OK]
    if bad:
        more = f" ({len(bad)} such files)" if len(bad) > 1 else ""
        raise HierError(f"image {where} is {bad[0][1]}: {bad[0][0]}{more}")


def image_files(inputs: list[str | Path], strict: bool = False) -> ImageSet:
    """Explicit image files and folders of photos, searched recursively, symlinked folders included
    (``iter_files``) (``hier predict``, ``index``, ``enroll``). In folders, files that are no image (a
    README, .DS_Store) are skipped with a count, and so are photos that do not decode or are too large
    unless ``strict``; an explicit file that is not a usable image is always refused. A file given twice
    (twice by name, by a folder and by name, or through a symlink) is kept once, where it came first,
    and counted."""
    paths: list[Path] = []
    explicit: list[Path] = []
    skipped: Counter = Counter()
    seen: set[tuple[int, int]] = set()

    def first_time(path: Path) -> bool:
        key = _file_key(path)
        if key in seen:
            skipped[REPEATED] += 1
            return False
        seen.add(key)
        return True

    for item in map(Path, inputs):
        if item.is_dir():
            files = [f for f in walk_files(item, skipped) if first_time(f)]
            status = check_images(files)
            bad = [(f, s) for f, s in zip(files, status) if s not in (OK, NOT_IMAGE)]
            if strict and bad:
                raise HierError(f"image in {item} is {bad[0][1]}: {bad[0][0]}"
                                + (f" ({len(bad)} such files)" if len(bad) > 1 else "") + " (--strict)")
            skipped.update(s for s in status if s != OK)
            paths += [f for f, s in zip(files, status) if s == OK]
        elif item.is_file():
            if first_time(item):
                explicit.append(item)
                paths.append(item)
        elif item.is_symlink():
            raise HierError(f"{item} is a symlink that leads nowhere (dangling or a loop): -> {os.readlink(item)}")
        else:
            raise HierError(f"no such image or folder: {item}")
    refuse_bad(explicit)
    if not paths:
        raise HierError("no images given" + (f" ({ImageSet([], skipped=skipped).skipped_message()})"
                                             if skipped else ""))
    return ImageSet(paths, skipped=skipped)


def photo_items(images) -> list:
    """What a call was given as photos, as a list: paths and folders checked and expanded
    (``image_files``), PIL images and arrays as they are, an ``ImageSet``'s paths (checked already)."""
    if isinstance(images, ImageSet):
        return images.paths
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    paths = [x for x in items if isinstance(x, (str, Path))]
    if len(paths) == len(items):
        return image_files(paths).paths
    return [y for x in items for y in (image_files([x]).paths if isinstance(x, (str, Path)) else [x])]
