"""Photos on disk -> checked, upright RGB arrays (``images``), users' CSVs (``tables``), dataset layouts
(``readers``), car crops (``detect``) and training's augmentation (``augment``)."""
from hier.data.images import (
    Crop, IMAGENET_MEAN, IMAGENET_STD, IMAGE_EXTS, ImageDataset, ImageSet, NOT_IMAGE, OK, TOO_LARGE,
    UNREADABLE, UploadRefused, check_image, check_images, decode_upload, eval_transform, image_files, iter_files,
    load_rgb, loader, pil_rgb, read_test_csv, refuse_bad, refuse_listed, require_cells, scan_folder, split_indices,
    to_rgb, to_uint8, walk_files)
from hier.data.tables import decode_text, first_repeat, read_table

__all__ = [
    "Crop", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "ImageDataset", "ImageSet", "NOT_IMAGE", "OK",
    "TOO_LARGE", "UNREADABLE", "UploadRefused", "check_image", "check_images", "decode_text", "decode_upload",
    "eval_transform", "first_repeat", "image_files", "iter_files", "load_rgb", "loader", "pil_rgb", "read_table",
    "read_test_csv", "refuse_bad", "refuse_listed", "require_cells", "scan_folder", "split_indices", "to_rgb",
    "to_uint8", "train_transform", "walk_files", "AUG_POLICIES"]


def __getattr__(name: str):
    """``train_transform`` and ``AUG_POLICIES`` on first use: they import albumentations (and scipy),
    which a predicting process does without."""
    if name in ("train_transform", "AUG_POLICIES"):
        from hier.data import augment
        return getattr(augment, name)
    raise AttributeError(f"module 'hier.data' has no attribute {name!r}")
