"""Dataset layouts, image checks, splits and augmentation.

Layouts: folder-per-class (``root/<class>/*.jpg``, as Hecto train and Stanford dev) and a test CSV
(``ID,img_path`` with paths relative to the CSV). Every file is checked once, up front, by its content
(not its extension): files that are no image, do not decode, or claim more pixels than PIL's
decompression-bomb limit are skipped with a count, so an epoch never dies on one bad photo. Photos are
turned upright by their EXIF orientation, as phones store portrait shots sideways.
"""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import albumentations as A
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedKFold, train_test_split

from hier.errors import HierError
from hier.taxonomy import nfc

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".jfif", ".heic"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Sizes are checked against PIL's limit in ``check_image``; its warning between 1x and 2x is noise here.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

OK, NOT_IMAGE, UNREADABLE, TOO_LARGE = "ok", "not an image", "unreadable", "too large"
_SKIPPED = {UNREADABLE: "unreadable image(s)", NOT_IMAGE: "non-image file(s)",
            TOO_LARGE: f"image(s) over PIL's {Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit"}


def load_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """The photo as an upright RGB array (EXIF orientation applied). With ``size``, a JPEG is decoded
    straight at the smallest 1/2, 1/4 or 1/8 scale still at least ``size`` pixels on each side (libjpeg
    DCT scaling, PIL ``draft``): a 1600 x 1200 phone photo for a 224 px model decodes at 400 x 300,
    several times faster, before the usual resize."""
    with Image.open(path) as im:
        if size:
            im.draft("RGB", (size, size))
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


class Crop(NamedTuple):
    """A box of a photo (x1, y1, x2, y2 in pixels of the upright photo): a labelled whole-car box or a
    detector's, used wherever a photo path is (datasets, the predictor)."""

    path: Path
    box: tuple[float, float, float, float]

    def __str__(self) -> str:
        return f"{self.path}#{','.join(str(round(v)) for v in self.box)}"

    def load(self) -> np.ndarray:
        rgb = load_rgb(self.path)           # full resolution: the box is in full-photo pixels
        h, w = rgb.shape[:2]
        x1, y1 = max(0, int(self.box[0])), max(0, int(self.box[1]))
        x2, y2 = min(w, int(np.ceil(self.box[2]))), min(h, int(np.ceil(self.box[3])))
        return np.ascontiguousarray(rgb[y1:y2, x1:x2]) if x2 - x1 >= 2 and y2 - y1 >= 2 else rgb


def to_rgb(image, size: int | None = None) -> np.ndarray:
    """A path, a ``Crop``, a PIL image or an array (H x W grey, H x W x 3 RGB, H x W x 4 RGBA; uint8)
    as an upright H x W x 3 uint8 RGB array: what every transform and the predictor take. ``size``:
    decode a JPEG path at reduced scale, at least that large (``load_rgb``)."""
    if isinstance(image, Crop):
        return image.load()
    if isinstance(image, (str, Path)):
        return load_rgb(image, size)
    if isinstance(image, Image.Image):
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        return np.ascontiguousarray(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])
    raise HierError(f"not an image: {type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
                    .strip() + " (give a path, a PIL image or an H x W x 3 uint8 RGB array)")


def check_image(path: Path) -> str:
    """OK, NOT_IMAGE, UNREADABLE or TOO_LARGE, by content: a photo named .png that holds a JPEG is OK.
    The extension only names why an unidentifiable file is skipped (a broken .jpg is UNREADABLE, a
    README NOT_IMAGE). Decodes at 1/8 scale (JPEG draft mode): fast, yet reads all entropy-coded data,
    so truncation shows."""
    return _check(path, path.suffix.lower() in IMAGE_EXTS)


def _check(source, image_named: bool) -> str:
    try:
        with Image.open(source) as im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                return TOO_LARGE
            im.draft("RGB", (64, 64))
            im.load()
        return OK
    except Image.DecompressionBombError:
        return TOO_LARGE
    except UnidentifiedImageError:
        return UNREADABLE if image_named else NOT_IMAGE
    except (OSError, ValueError, SyntaxError, EOFError):
        return UNREADABLE


class UploadRefused(HierError):
    """An uploaded photo that is not one: ``reason`` is NOT_IMAGE, UNREADABLE or TOO_LARGE."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_upload(data: bytes, name: str = "upload", size: int | None = None) -> np.ndarray:
    """An uploaded file's bytes -> upright RGB array, checked by content as ``check_image`` checks files
    (a service never trusts the name or the declared type). ``size``: reduced-scale JPEG decode."""
    if not data:
        raise UploadRefused(UNREADABLE, f"{name} is empty (0 bytes)")
    why = _check(io.BytesIO(data), False)
    if why != OK:
        detail = {NOT_IMAGE: "is not an image", UNREADABLE: "does not decode (truncated or damaged)",
                  TOO_LARGE: f"has over PIL's {Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"}[why]
        raise UploadRefused(why, f"{name} {detail}")
    return load_rgb(io.BytesIO(data), size)


def check_images(paths: list[Path]) -> list[str]:
    """``check_image`` for every path, in parallel threads (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(check_image, paths))


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
    if not csv.is_file():
        raise HierError(f"test CSV not found: {csv}")
    table = pd.read_csv(csv, dtype=str, encoding="utf-8-sig")
    if not {"ID", "img_path"} <= set(table.columns):
        raise HierError(f"{csv} must have columns ID,img_path (found {','.join(table.columns)})")
    require_cells(table, ["ID", "img_path"], csv)
    if table["ID"].duplicated().any():
        raise HierError(f"{csv} lists ID {table['ID'][table['ID'].duplicated()].iloc[0]!r} twice")
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
    """Explicit image files and folders of photos, searched recursively (``hier predict``, ``index``).
    In folders, files that are no image (a README, .DS_Store) are skipped with a count, and so are
    photos that do not decode or are too large unless ``strict``; an explicit file that is not a usable
    image is always refused."""
    paths: list[Path] = []
    explicit: list[Path] = []
    skipped: Counter = Counter()
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(f for f in item.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(item).parts))
            status = check_images(files)
            bad = [(f, s) for f, s in zip(files, status) if s not in (OK, NOT_IMAGE)]
            if strict and bad:
                raise HierError(f"image in {item} is {bad[0][1]}: {bad[0][0]}"
                                + (f" ({len(bad)} such files)" if len(bad) > 1 else "") + " (--strict)")
            skipped.update(s for s in status if s != OK)
            paths += [f for f, s in zip(files, status) if s == OK]
        elif item.is_file():
            explicit.append(item)
            paths.append(item)
        else:
            raise HierError(f"no such image or folder: {item}")
    refuse_bad(explicit)
    if not paths:
        raise HierError("no images given" + (f" ({ImageSet([], skipped=skipped).skipped_message()})"
                                             if skipped else ""))
    return ImageSet(paths, skipped=skipped)


def split_indices(labels: list[str], val_frac: float = 0.2, seed: int = 0,
                  fold: int | None = None, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices: a seeded hold-out split, or fold ``fold`` of ``folds`` (k-fold)."""
    idx = np.arange(len(labels))
    counts = pd.Series(labels).value_counts()
    if fold is not None:
        if not 0 <= fold < folds:
            raise HierError(f"--fold must be in 0..{folds - 1}")
        if counts.min() < folds:
            raise HierError(f"class {counts.idxmin()!r} has {counts.min()} photo(s); --folds {folds} needs "
                            f"at least {folds} per class")
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(skf.split(idx, labels))[fold]
    if val_frac <= 0:
        return idx, idx[:0]
    if counts.min() < 2:
        raise HierError(f"class {counts.idxmin()!r} has one photo; a validation split needs two or more per "
                        "class (or pass --val-frac 0)")
    n_val = int(np.ceil(val_frac * len(labels)))
    if n_val < len(counts) or len(labels) - n_val < len(counts):
        raise HierError(f"--val-frac {val_frac} of {len(labels)} photos gives {n_val} validation and "
                        f"{len(labels) - n_val} training photos for {len(counts)} classes; each side needs "
                        "one per class (change --val-frac, or 0 for no validation)")
    return train_test_split(idx, test_size=val_frac, stratify=labels, random_state=seed)


def train_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None) -> A.Compose:
    """Whole-car square resize, then mild crop/flip/colour: cars are wide, a tight crop cuts off the badge.
    With ``seed`` the augmentations repeat run to run (``hier train --seed``)."""
    return A.Compose([
        A.Resize(img_size, img_size),
        A.RandomResizedCrop((img_size, img_size), scale=(0.6, 1.0), ratio=(0.8, 1.25)),
        A.HorizontalFlip(),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
        A.Normalize(mean, std),
        ToTensorV2(),
    ], seed=seed)


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> A.Compose:
    return A.Compose([A.Resize(img_size, img_size), A.Normalize(mean, std), ToTensorV2()])


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label index) pairs; label -1 where there is none (test images). Images are paths,
    PIL images or arrays (``to_rgb``)."""

    def __init__(self, images: list, targets: list[int] | None, transform: A.Compose, decode_size: int | None = None):
        self.images, self.transform, self.decode_size = images, transform, decode_size
        self.targets = targets if targets is not None else [-1] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(image=to_rgb(self.images[i], self.decode_size))["image"], self.targets[i]


def _reseed_worker(_: int) -> None:
    """Each worker holds a copy of a seeded transform; give each its own (still reproducible) seed."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if getattr(transform, "seed", None) is not None:
        transform.set_random_seed(info.seed % 2**32)


def loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool = False,
           workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=_reseed_worker)
