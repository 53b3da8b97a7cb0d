"""Photos on disk -> checked, upright RGB arrays (``images``), users' CSVs (``tables``), dataset layouts
(``readers``) and car crops (``detect``)."""
from hier.data.images import (
    Crop, IMAGENET_MEAN, IMAGENET_STD, IMAGE_EXTS, ImageDataset, ImageSet, NOT_IMAGE, OK, TOO_LARGE,
    UNREADABLE, UploadRefused, check_image, check_images, decode_upload, eval_transform, image_files, iter_files,
    load_rgb, loader, pil_rgb, read_test_csv, refuse_bad, refuse_listed, require_cells, scan_folder, split_indices,
    to_rgb, to_uint8, train_transform, walk_files, AUG_POLICIES)
from hier.data.tables import decode_text, first_repeat, read_table

__all__ = [
    "Crop", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "ImageDataset", "ImageSet", "NOT_IMAGE", "OK",
    "TOO_LARGE", "UNREADABLE", "UploadRefused", "check_image", "check_images", "decode_text", "decode_upload",
    "eval_transform", "first_repeat", "image_files", "iter_files", "load_rgb", "loader", "pil_rgb", "read_table",
    "read_test_csv", "refuse_bad", "refuse_listed", "require_cells", "scan_folder", "split_indices", "to_rgb",
    "to_uint8", "train_transform", "walk_files", "AUG_POLICIES"]
