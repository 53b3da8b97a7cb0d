"""Listing photos as small JPEG thumbnails: decoded at reduced scale, refused past a pixel count, cached
by the file's stamp."""
from __future__ import annotations

from functools import lru_cache
from io import BytesIO

from PIL import Image

from hier.data import pil_rgb

THUMB = 256                              # thumbnail side, pixels
THUMB_MAX_PIXELS = 50_000_000            # after the reduced-scale JPEG decode; larger photos get no thumbnail


@lru_cache(maxsize=1024)
def thumbnail_jpeg(path: str, stamp: tuple) -> bytes | None:
    """The photo as a THUMB px JPEG (None when it no longer decodes or is too large), cached by the
    file's ``stamp``. A JPEG decodes at reduced scale (PIL draft: a 9000 x 9000 photo at 1125 x 1125);
    the pixel count is checked after that, before any pixel is decoded."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB, THUMB))
            if im.width * im.height > THUMB_MAX_PIXELS:
                return None
            im = Image.fromarray(pil_rgb(im))      # the one decoder: upright, 16-bit photos scaled, not clipped
            im.thumbnail((THUMB, THUMB))
            buf = BytesIO()
            im.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
