"""Exclude lists: the photos training should leave out (``hier audit --write-exclude``'s file, or one a
user wrote), one path per line relative to the data folder.

A user's file reads as people write them: blank lines and ``#`` comments are ignored and each line is
stripped. A path that would not survive that (spaces at either end, a leading ``#`` or ``"``, a line
break in it) is written as a JSON string, ``"..."``, which is read back exactly, so every path the audit
lists is the path training leaves out (``format_exclude`` / ``parse_exclude``).
"""
from __future__ import annotations

import dataclasses
import json
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


def format_exclude(names: list[str]) -> str:
    """An exclude file listing ``names`` (paths relative to the data folder) that reads back exactly."""
    def line(name: str) -> str:
        plain = name == name.strip() and name and not name.startswith(("#", '"')) and \
            not any(c in name for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
        return name if plain else json.dumps(name, ensure_ascii=False)
    return "".join(f"{line(n)}\n" for n in names)


def parse_exclude(text: str) -> list[str]:
    """The names an exclude file lists: ``"..."`` lines as JSON strings, others stripped; blank lines
    and ``#`` comments ignored."""
    names = []
    for raw in text.split("\n"):
        line = raw.strip()
        if line.startswith('"'):
            try:
                names.append(json.loads(line))
                continue
            except ValueError:
                pass
        if line and not line.startswith("#"):
            names.append(line)
    return names


def exclude_names(path: str | Path) -> list[str]:
    """The names the exclude file at ``path`` lists (``parse_exclude``), or one line why it does not read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise HierError(f"exclude file {path} is a folder") from None
    except OSError as e:
        raise HierError(f"cannot read exclude file {path} ({e.strerror or e})") from None
    text, _ = decode_text(raw, str(path))
    return parse_exclude(text)


def read_exclude(path: str | Path, data_dir: str | Path) -> set[str]:
    """The paths an exclude file lists, joined to ``data_dir`` and normalised as ``apply_exclude``
    compares them."""
    return exclude_keys(exclude_names(path), data_dir)


def exclude_keys(names: list[str], data_dir: str | Path) -> set[str]:
    """``names`` (relative to ``data_dir``) as ``apply_exclude`` compares them."""
    return {_key(Path(data_dir) / n) for n in names}


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
