"""Dataset layouts, image checks, splits and the evaluation transform (training's augmentation: ``augment``).

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
from typing import Iterator, NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hier.data.tables import first_repeat, read_table
from hier.errors import HierError
from hier.taxonomy import nfc

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".jfif", ".heic"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Sizes are checked against PIL's limit in ``check_image``; its warning between 1x and 2x is noise here.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

OK, NOT_IMAGE, UNREADABLE, TOO_LARGE = "ok", "not an image", "unreadable", "too large"
REPEATED, DANGLING, REVISITED = "repeated", "dangling symlink", "folder reached twice"
_SKIPPED = {UNREADABLE: "unreadable image(s)", NOT_IMAGE: "non-image file(s)",
            TOO_LARGE: f"image(s) over PIL's {Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit",
            REPEATED: "repeat(s) of a file already given", DANGLING: "dangling symlink(s)",
            REVISITED: "symlinked folder(s) already searched (a loop or a second link)"}


def load_rgb(path, size: int | None = None) -> np.ndarray:
    """The photo (a path or a file object) as an upright RGB array (EXIF orientation applied). With
    ``size``, a JPEG is decoded straight at the smallest 1/2, 1/4 or 1/8 scale still at least ``size``
    pixels on each side (libjpeg DCT scaling, PIL ``draft``): a 1600 x 1200 phone photo for a 224 px
    model decodes at 400 x 300, several times faster, before the usual resize."""
    with Image.open(path) as im:
        if size:
            im.draft("RGB", (size, size))
        return pil_rgb(im)


def pil_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image as an upright H x W x 3 uint8 array. 16-bit grey (``I;16*``), 32-bit int (``I``)
    and float (``F``) images are scaled to 0..255 first (``to_uint8``): PIL's own ``convert("RGB")``
    clips them, so a 16-bit photo came out white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        grey = to_uint8(np.asarray(im))
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    return np.asarray(im.convert("RGB"))


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Pixel values as uint8, scaled by their type's range where it has one and by the data's where not:
    uint8 as is; uint16 (a 16-bit PNG / TIFF) by 255/65535; other integers (32-bit TIFF, arrays after
    arithmetic) as 8-bit when within 0..255, as 16-bit when within 0..65535, else stretched from their
    min..max; floats as 0..1 when within it, 0..255 when within that, else min..max (nan -> the
    minimum, +-inf -> the ends); bool as 0/255. A constant image out of those ranges becomes black."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if a.dtype.kind not in "iuf" or a.size == 0:
        raise HierError(f"cannot read {a.dtype} pixels as an image (give uint8, uint16, int or float values)")
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            vals = a[finite]
            lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 0.0)
            a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    lo, hi = float(a.min()), float(a.max())
    floats = a.dtype.kind == "f"
    if lo >= 0 and floats and hi <= 1:
        scale, lo = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, lo = 1.0, 0.0
    elif lo >= 0 and hi <= 65535 and not floats:
        scale, lo = 255.0 / 65535, 0.0
    else:
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((a.astype(np.float32) - lo) * scale), 0, 255).astype(np.uint8)


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
    """A path, a ``Crop``, a PIL image or an array (H x W grey, H x W x 1, H x W x 3 RGB or H x W x 4
    RGBA) as an upright H x W x 3 uint8 RGB array: what every transform and the predictor take. Arrays
    of uint16, other integers or floats are scaled to 0..255 (``to_uint8``), never clipped. ``size``:
    decode a JPEG path at reduced scale, at least that large (``load_rgb``)."""
    if isinstance(image, Crop):
        return image.load()
    if isinstance(image, (str, Path)):
        return load_rgb(image, size)
    if isinstance(image, Image.Image):
        return pil_rgb(image)
    if isinstance(image, np.ndarray) and image.size and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        pixels = to_uint8(image if image.ndim == 2 else image[..., :3])
        if pixels.ndim == 2 or pixels.shape[2] == 1:
            pixels = np.repeat(pixels.reshape(pixels.shape[:2])[..., None], 3, axis=-1)
        return np.ascontiguousarray(pixels)
    raise HierError(f"not an image: {type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
                    .strip() + " (give a path, a PIL image or an H x W, H x W x 3 or H x W x 4 array)")


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
        from sklearn.model_selection import StratifiedKFold      # here: predicting needs no scikit-learn
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
    from sklearn.model_selection import train_test_split
    return train_test_split(idx, test_size=val_frac, stratify=labels, random_state=seed)


class EvalTransform:
    """The evaluation photos' transform: square resize (OpenCV bilinear), ImageNet normalisation, CHW
    tensor. The same pixels as albumentations' ``Compose([Resize, Normalize, ToTensorV2])`` (a test
    checks it) and the same call (``transform(image=array)["image"]``), written here so that predicting
    does not import albumentations and the scipy it pulls in (about a second of every command's start)."""

    def __init__(self, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.img_size = img_size
        self.mean = np.asarray(mean, np.float32) * 255
        self.inv_std = 1 / (np.asarray(std, np.float32) * 255)

    def __call__(self, *, image: np.ndarray) -> dict:
        if image.shape[:2] != (self.img_size, self.img_size):
            image = cv2.resize(image, (self.img_size, self.img_size), interpolation=cv2.INTER_LINEAR)
        x = (image.astype(np.float32) - self.mean) * self.inv_std
        return {"image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))}


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> EvalTransform:
    return EvalTransform(img_size, mean, std)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label index) pairs; label -1 where there is none (test images). Images are paths,
    PIL images or arrays (``to_rgb``)."""

    def __init__(self, images: list, targets: list[int] | None, transform, decode_size: int | None = None):
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
           workers: int = 0, drop_last: bool = False, sampler=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       sampler=sampler,
                                       drop_last=drop_last, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=_reseed_worker)
