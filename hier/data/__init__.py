"""Photos and data sets: one photo decoded and checked (``images``), sets of photos on disk (``files``),
batches (``loading``), users' CSVs (``tables``), dataset layouts (``readers``), car crops (``detect``),
exclude lists (``exclude``), the training split (``split``) and training's augmentation (``augment``)."""
from hier.data.files import (
    ImageSet,
    image_files,
    iter_files,
    photo_items,
    read_test_csv,
    refuse_bad,
    refuse_listed,
    require_cells,
    scan_folder,
    walk_files,
)
from hier.data.images import (
    IMAGE_EXTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NOT_IMAGE,
    OK,
    TOO_LARGE,
    UNREADABLE,
    Crop,
    UploadRefused,
    check_image,
    check_images,
    decode_upload,
    load_rgb,
    pil_rgb,
    to_rgb,
    to_uint8,
)
from hier.data.loading import ImageDataset, eval_transform, loader
from hier.data.split import split_indices
from hier.data.tables import decode_text, first_repeat, read_table

__all__ = [
    "Crop", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "ImageDataset", "ImageSet", "NOT_IMAGE", "OK",
    "TOO_LARGE", "UNREADABLE", "UploadRefused", "check_image", "check_images", "decode_text", "decode_upload",
    "eval_transform", "first_repeat", "image_files", "iter_files", "load_rgb", "loader", "photo_items", "pil_rgb",
    "read_table", "read_test_csv", "refuse_bad", "refuse_listed", "require_cells", "scan_folder", "split_indices",
    "to_rgb", "to_uint8", "train_transform", "walk_files", "AUG_POLICIES"]


def __getattr__(name: str):
    """``train_transform`` and ``AUG_POLICIES`` on first use: they import albumentations (and scipy),
    which a predicting process does without."""
    if name in ("train_transform", "AUG_POLICIES"):
        from hier.data import augment
        return getattr(augment, name)
    raise AttributeError(f"module 'hier.data' has no attribute {name!r}")
