"""Exclude lists: the photos training should leave out (``hier audit --write-exclude``'s file, or one a
user wrote), one path per line relative to the data folder."""
from __future__ import annotations

import dataclasses
import os
import unicodedata
from pathlib import Path

from hier.data.files import ImageSet
from hier.data.images import Crop
from hier.data.tables import decode_text
from hier.errors import HierError


def photo_path(item) -> Path:
    """The file of a photo item (a path, or a ``Crop`` of one)."""
    return item.path if isinstance(item, Crop) else Path(item)


def _key(path: str | Path) -> str:
    """How a photo's path is compared: normalised separators and dots, Unicode NFC (a Mac's NFD names)."""
    return unicodedata.normalize("NFC", os.path.normpath(str(path)))


def read_exclude(path: str | Path, data_dir: str | Path) -> set[str]:
    """The paths an exclude file lists (one per line, relative to ``data_dir``; blank lines and ``#``
    comments ignored), joined to ``data_dir`` and normalised as ``apply_exclude`` compares them."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise HierError(f"exclude file {path} is a folder") from None
    except OSError as e:
        raise HierError(f"cannot read exclude file {path} ({e.strerror or e})") from None
    text, _ = decode_text(raw, str(path))
    names = (line.strip() for line in text.splitlines())
    return {_key(Path(data_dir) / n) for n in names if n and not n.startswith("#")}


def apply_exclude(images: ImageSet, paths: set[str]) -> tuple[ImageSet, int]:
    """``images`` without the photos ``paths`` (from ``read_exclude``) names, and how many names are
    not among them: a list written for other data, or files since removed (the trainer says so)."""
    keys = [_key(photo_path(p)) for p in images.paths]
    keep = [i for i, k in enumerate(keys) if k not in paths]

    def pick(values):
        return None if values is None else [values[i] for i in keep]

    kept = dataclasses.replace(images, paths=pick(images.paths), labels=pick(images.labels), ids=pick(images.ids),
                               skipped=images.skipped.copy())
    return kept, len(paths - set(keys))
