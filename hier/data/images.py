"""One photo: decoded to an upright RGB array, checked by its content, cropped, or refused as an upload.

Every file is checked by its content (not its extension): files that are no image, do not decode, or
claim more pixels than PIL's decompression-bomb limit are refused (``check_image``). Photos are turned
upright by their EXIF orientation, as phones store portrait shots sideways.
"""
from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hier.errors import HierError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".jfif", ".heic"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Sizes are checked against PIL's limit in ``check_image``; its warning between 1x and 2x is noise here.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

OK, NOT_IMAGE, UNREADABLE, TOO_LARGE = "ok", "not an image", "unreadable", "too large"
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


