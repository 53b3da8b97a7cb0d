"""Dataset readers: a layout on disk -> checked photos (paths, or ``Crop`` boxes of them) with class
names, and the taxonomy the layout implies.

``create_reader(root, layout="auto")`` picks one:
- ``folder``: one folder per class, ``root/<class>/*.jpg`` (Hecto train, Stanford dev); classes are
  parsed from the names or given by a taxonomy CSV;
- ``aihub``: AI-hub "자동차 차종/연식/번호판 인식용 영상", ``root/<BR_브랜드>/<NNN_모델>/<YYYY_색상_트림>/*.jpg``
  with a JSON label beside each photo (same name, ``.json``): brand, model and year from its
  ``rawDataInfo`` (the folder names where a field is missing), the whole-car box (``P00.차량전체``) of
  ``learningDataInfo.objects`` as the crop. The taxonomy is built from the labels: class
  ``<model>_<year>_<year>`` under its model and brand. A label that is missing, malformed or has no
  whole-car box falls back to the folder names and the full photo, and is counted.
Unlabelled inputs (``hier predict``/``index``) are read by ``hier.data.image_files`` (files and
recursive folders) and ``read_test_csv`` (Hecto ``test.csv``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from hier.data.files import ImageSet, iter_files, scan_folder, walk_files
from hier.data.images import OK, Crop, check_images
from hier.errors import HierError
from hier.taxonomy import Taxonomy, nfc

LAYOUTS = ("auto", "folder", "aihub")
WHOLE_CAR = "P00"                      # AI-hub object class of the whole-car box ("P00.차량전체")
_YEAR = re.compile(r"(19|20)\d\d")


def detect_layout(root: Path) -> str:
    """``aihub`` when the photos come with JSON labels, ``folder`` otherwise (symlinked folders are
    searched too, ``iter_files``)."""
    return "aihub" if any(p.suffix.lower() == ".json" for p in iter_files(root)) else "folder"


def create_reader(root: str | Path, layout: str = "auto"):
    """A function ``() -> (ImageSet, Taxonomy | None)`` for the labelled dataset at ``root``."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise HierError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise HierError(f"data folder not found: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    return (lambda: read_aihub(root)) if layout == "aihub" else (lambda: (scan_folder(root), None))


# --- AI-hub ----------------------------------------------------------------------------------------------

_BRAND_CODE, _MODEL_CODE = re.compile(r"^[A-Z]{1,3}\d*_(?=.)"), re.compile(r"^\d+_(?=.)")


def _strip_code(name: str, code: re.Pattern) -> str:
    """``BR_현대`` -> 현대, ``001_쏘나타`` -> 쏘나타: AI-hub prefixes folder names with a code."""
    return code.sub("", name, count=1)


def _field(info: dict, *words: str):
    """The first value of ``info`` whose key contains one of ``words`` (AI-hub spells keys variously)."""
    for key, value in info.items():
        if any(w in key.lower() for w in words) and value not in (None, ""):
            return value
    return None


def _box(obj: dict) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) from the box spellings AI-hub labels use: ``coords: {tl, br}``,
    ``bbox: [x, y, w, h]`` or ``{x, y, w, h}``, ``points: [[x1, y1], [x2, y2]]``."""
    try:
        if isinstance(obj.get("coords"), dict) and {"tl", "br"} <= set(obj["coords"]):
            tl, br = obj["coords"]["tl"], obj["coords"]["br"]
            x1, y1, x2, y2 = float(tl["x"]), float(tl["y"]), float(br["x"]), float(br["y"])
        elif isinstance(obj.get("bbox"), dict):
            b = obj["bbox"]
            x1, y1 = float(b["x"]), float(b["y"])
            x2, y2 = x1 + float(b["w"] if "w" in b else b["width"]), y1 + float(b["h"] if "h" in b else b["height"])
        elif isinstance(obj.get("bbox"), (list, tuple)) and len(obj["bbox"]) == 4:
            x1, y1, w, h = map(float, obj["bbox"])
            x2, y2 = x1 + w, y1 + h
        elif isinstance(obj.get("points"), (list, tuple)) and len(obj["points"]) >= 2:
            xs, ys = zip(*[(float(p[0]), float(p[1])) for p in obj["points"]])
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        else:
            return None
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    return (x1, y1, x2, y2) if x2 - x1 >= 2 and y2 - y1 >= 2 else None


def _whole_car(label: dict):
    objects = (label.get("learningDataInfo") or {}).get("objects") or []
    for obj in objects:
        if isinstance(obj, dict) and any(isinstance(v, str) and v.startswith(WHOLE_CAR) for v in obj.values()):
            return _box(obj)
    return None


def read_aihub(root: Path) -> tuple[ImageSet, Taxonomy]:
    """Photos under ``root/<brand>/<model>/<year_...>/`` with their labels; see the module docstring."""
    skipped: Counter = Counter()
    photos = [p for p in walk_files(root, skipped)
              if p.suffix.lower() != ".json" and len(p.relative_to(root).parts) >= 4]
    if not photos:
        raise HierError(f"{root} has no photos in the AI-hub layout <brand>/<model>/<year_color_trim>/*.jpg")
    status = check_images(photos)
    skipped.update(s for s in status if s != OK)
    items, labels, rows = [], [], {}
    for photo in (p for p, s in zip(photos, status) if s == OK):
        brand_dir, model_dir, year_dir = photo.relative_to(root).parts[-4:-1]
        label_file = photo.with_suffix(".json")
        try:
            label = json.loads(label_file.read_text(encoding="utf-8-sig"))
            info = label.get("rawDataInfo") or {}
            if not isinstance(info, dict):
                raise ValueError
        except (OSError, ValueError, AttributeError):
            label, info = {}, {}
            skipped["label missing or malformed (folder names used)"] += 1
        brand = nfc(str(_field(info, "brand") or _strip_code(brand_dir, _BRAND_CODE)))
        model = nfc(str(_field(info, "model") or _strip_code(model_dir, _MODEL_CODE)))
        year_match = _YEAR.search(str(_field(info, "year") or "")) or _YEAR.search(year_dir)
        if not year_match:
            skipped["no year in label or folder (photo left out)"] += 1
            continue
        year = int(year_match.group(0))
        name = f"{model}_{year}_{year}"
        box = _whole_car(label) if label else None
        if label and box is None:
            skipped["no whole-car box (full photo used)"] += 1
        items.append(Crop(photo, box) if box else photo)
        labels.append(name)
        rows[name] = {"class": name, "brand": brand, "model": model, "year_start": year, "year_end": year}
    if not items:
        raise HierError(f"{root}: no labelled photo could be read")
    taxonomy = Taxonomy(pd.DataFrame(sorted(rows.values(), key=lambda r: (r["brand"], r["model"], r["class"]))))
    return ImageSet(items, labels, skipped=skipped), taxonomy
