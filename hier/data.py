"""Dataset layouts, image checks, splits and augmentation.

Layouts: folder-per-class (``root/<class>/*.jpg``, as Hecto train and Stanford dev) and a test CSV
(``ID,img_path`` with paths relative to the CSV). Images that do not decode are found once, up front,
and skipped with a count, so an epoch never dies on a bad JPEG.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedKFold, train_test_split

from hier.errors import HierError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _decodes(path: Path) -> bool:
    """Decode at 1/8 scale (JPEG draft mode): fast, yet reads all entropy-coded data, so truncation shows."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


def readable(paths: list[Path]) -> np.ndarray:
    """Boolean mask of the paths that decode, checked in parallel threads (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return np.fromiter(pool.map(_decodes, paths), dtype=bool, count=len(paths))


@dataclass
class ImageSet:
    """Image paths with optional class names, plus what was skipped while scanning."""

    paths: list[Path]
    labels: list[str] | None = None
    ids: list[str] | None = None
    unreadable: int = 0
    non_images: int = 0

    def skipped_message(self) -> str | None:
        parts = [f"{n} {what}" for n, what in ((self.unreadable, "unreadable image(s)"),
                                               (self.non_images, "non-image file(s)")) if n]
        return f"skipped {' and '.join(parts)}" if parts else None


def scan_folder(root: str | Path) -> ImageSet:
    """Folder-per-class layout -> checked image paths and class names."""
    root = Path(root)
    if not root.is_dir():
        raise HierError(f"data folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise HierError(f"{root} has no class folders (expected {root}/<class>/*.jpg)")
    paths, labels, non_images = [], [], 0
    for d in class_dirs:
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(d.name)
            else:
                non_images += 1
    ok = readable(paths)
    kept = ImageSet([p for p, g in zip(paths, ok) if g], [c for c, g in zip(labels, ok) if g],
                    unreadable=int((~ok).sum()), non_images=non_images)
    empty = sorted({d.name for d in class_dirs} - set(kept.labels))
    if empty:
        raise HierError(f"class folder {root / empty[0]} has no readable images"
                        + (f" ({len(empty)} such folders)" if len(empty) > 1 else ""))
    return kept


def read_test_csv(csv: str | Path) -> ImageSet:
    """``ID,img_path`` CSV (paths relative to the CSV's folder) -> checked image paths and IDs."""
    csv = Path(csv)
    if not csv.is_file():
        raise HierError(f"test CSV not found: {csv}")
    table = pd.read_csv(csv, dtype=str, encoding="utf-8-sig")
    if not {"ID", "img_path"} <= set(table.columns):
        raise HierError(f"{csv} must have columns ID,img_path (found {','.join(table.columns)})")
    if table["ID"].duplicated().any():
        raise HierError(f"{csv} lists ID {table['ID'][table['ID'].duplicated()].iloc[0]!r} twice")
    paths = [(csv.parent / p).resolve() for p in table["img_path"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise HierError(f"{len(missing)} image(s) listed in {csv} do not exist, e.g. {missing[0]}")
    ok = readable(paths)
    if not ok.all():
        bad = [p for p, g in zip(paths, ok) if not g]
        raise HierError(f"{len(bad)} image(s) listed in {csv} cannot be read, e.g. {bad[0]}")
    return ImageSet(paths, ids=table["ID"].tolist())


def image_files(inputs: list[str | Path]) -> ImageSet:
    """Explicit image paths or folders of images (for ``hier predict IMAGES...``); refuses non-images."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(f for f in item.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif item.is_file():
            paths.append(item)
        else:
            raise HierError(f"no such image or folder: {item}")
    if not paths:
        raise HierError("no images given")
    ok = readable(paths)
    if not ok.all():
        raise HierError(f"not a readable image: {paths[int(np.argmin(ok))]}")
    return ImageSet(paths)


def split_indices(labels: list[str], val_frac: float = 0.2, seed: int = 0,
                  fold: int | None = None, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices: a seeded hold-out split, or fold ``fold`` of ``folds`` (k-fold)."""
    idx = np.arange(len(labels))
    if fold is not None:
        if not 0 <= fold < folds:
            raise HierError(f"--fold must be in 0..{folds - 1}")
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(skf.split(idx, labels))[fold]
    if val_frac <= 0:
        return idx, idx[:0]
    counts = pd.Series(labels).value_counts()
    if counts.min() < 2:
        raise HierError(f"class {counts.idxmin()!r} has one image; a stratified split needs two or more")
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
    """(image tensor, label index) pairs; label -1 where there is none (test images)."""

    def __init__(self, paths: list[Path], targets: list[int] | None, transform: A.Compose):
        self.paths, self.transform = paths, transform
        self.targets = targets if targets is not None else [-1] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(image=load_rgb(self.paths[i]))["image"], self.targets[i]


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
