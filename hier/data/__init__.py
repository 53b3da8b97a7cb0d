"""Photos on disk -> checked, upright RGB arrays (``images``), dataset layouts (``readers``) and
car crops (``detect``)."""
from hier.data.images import (
    Crop, IMAGENET_MEAN, IMAGENET_STD, IMAGE_EXTS, ImageDataset, ImageSet, NOT_IMAGE, OK, TOO_LARGE,
    UNREADABLE, UploadRefused, check_image, check_images, decode_upload, eval_transform, image_files, load_rgb,
    loader, read_test_csv, refuse_bad, refuse_listed, require_cells, scan_folder, split_indices, to_rgb,
    train_transform)

__all__ = [
    "Crop", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "ImageDataset", "ImageSet", "NOT_IMAGE", "OK",
    "TOO_LARGE", "UNREADABLE", "UploadRefused", "check_image", "check_images", "decode_upload",
    "eval_transform", "image_files", "load_rgb", "loader", "read_test_csv", "refuse_bad", "refuse_listed",
    "require_cells", "scan_folder", "split_indices", "to_rgb", "train_transform"]
