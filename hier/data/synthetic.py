"""Synthetic, hierarchical car dataset so that ``hier demo`` runs offline.

The real data (Hecto-style car photos) is large and licensed, so the demo draws
its own images.  The hierarchy brand -> model -> fine class is encoded in
pixels on purpose, so a hierarchical model has something to learn at each
level:

* brand      -> body colour palette + badge shape on the door;
* model      -> body silhouette (shared across brands, so shape alone does not
                reveal the brand);
* year range -> headlight shape (round vs. slit), plus a roof rail and chrome
                window trim on newer cars; the same cue for every brand (a
                subtle, fine-grained detail).

Everything is pure Pillow + numpy and deterministic given a seed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "TAXONOMY",
    "NEW_STYLE_FROM",
    "draw_car",
    "class_name",
]

# Year ranges starting at or after this year get the "new" style details.
NEW_STYLE_FROM = 2019

# brand -> (palette of RGB body colours, badge shape)
_BRANDS: dict[str, tuple[list[tuple[int, int, int]], str]] = {
    "Aurora": ([(200, 30, 35), (150, 15, 30), (230, 95, 25)], "circle"),
    "Borealis": ([(30, 70, 200), (15, 35, 120), (30, 140, 190)], "triangle"),
    "Cinder": ([(40, 150, 50), (95, 120, 25), (150, 195, 40)], "square"),
}

# model -> (brand, silhouette, [(year_start, year_end), (year_start, year_end)])
# Silhouettes repeat across brands on purpose (sedan, suv).
_MODELS: dict[str, tuple[str, str, list[tuple[int, int]]]] = {
    "Nova": ("Aurora", "sedan", [(2015, 2018), (2019, 2023)]),
    "Vela": ("Aurora", "suv", [(2014, 2018), (2019, 2024)]),
    "Lynx": ("Borealis", "hatchback", [(2016, 2018), (2019, 2022)]),
    "Orca": ("Borealis", "sedan", [(2013, 2018), (2019, 2023)]),
    "Pike": ("Cinder", "coupe", [(2015, 2018), (2019, 2024)]),
    "Rook": ("Cinder", "suv", [(2014, 2018), (2019, 2023)]),
}


def class_name(brand: str, model: str, year_start: int, year_end: int) -> str:
    """Fine-class name; underscores only, so it is a safe folder name everywhere."""
    return f"{brand}_{model}_{year_start}_{year_end}"


# (class, brand, model, year_start, year_end), sorted by class name.
TAXONOMY: list[tuple[str, str, str, int, int]] = sorted(
    (class_name(b, m, y0, y1), b, m, y0, y1)
    for m, (b, _, years) in _MODELS.items()
    for y0, y1 in years
)

# Side-view outlines in car-length units: x in [0, 1] from rear to front, y up
# from the ground.  "body" is the whole profile, "window" the greenhouse glass.
_SHAPES: dict[str, dict] = {
    "sedan": {
        "body": [(0.0, 0.10), (0.0, 0.27), (0.05, 0.30), (0.25, 0.31), (0.35, 0.46),
                 (0.62, 0.46), (0.74, 0.31), (0.97, 0.27), (1.0, 0.22), (1.0, 0.10)],
        "window": [(0.29, 0.31), (0.37, 0.43), (0.60, 0.43), (0.70, 0.31)],
        "roof": (0.37, 0.60, 0.46),
        "belt": 0.29,
        "wheels": (0.19, 0.80, 0.085),
    },
    "suv": {
        "body": [(0.0, 0.13), (0.0, 0.56), (0.03, 0.60), (0.66, 0.60), (0.80, 0.40),
                 (0.98, 0.37), (1.0, 0.30), (1.0, 0.13)],
        "window": [(0.04, 0.39), (0.05, 0.56), (0.65, 0.56), (0.76, 0.39)],
        "roof": (0.05, 0.64, 0.60),
        "belt": 0.36,
        "wheels": (0.18, 0.80, 0.10),
    },
    "hatchback": {
        "body": [(0.04, 0.10), (0.0, 0.30), (0.06, 0.52), (0.55, 0.53), (0.74, 0.33),
                 (0.97, 0.28), (1.0, 0.22), (1.0, 0.10)],
        "window": [(0.06, 0.33), (0.09, 0.49), (0.54, 0.50), (0.69, 0.33)],
        "roof": (0.09, 0.54, 0.53),
        "belt": 0.30,
        "wheels": (0.20, 0.80, 0.09),
    },
    "coupe": {
        "body": [(0.0, 0.08), (0.0, 0.21), (0.08, 0.24), (0.28, 0.27), (0.45, 0.37),
                 (0.58, 0.37), (0.70, 0.25), (0.97, 0.20), (1.0, 0.16), (1.0, 0.08)],
        "window": [(0.33, 0.27), (0.46, 0.35), (0.57, 0.35), (0.66, 0.26)],
        "roof": (0.46, 0.57, 0.37),
        "belt": 0.22,
        "wheels": (0.20, 0.80, 0.075),
    },
}

_SUPERSAMPLE = 2  # draw at 2x and downscale: cheap anti-aliasing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random clutter so the classifier must look at the car, not the canvas."""
    # Muted colours: strong saturation would compete with the brand palette.
    c1 = 0.5 * rng.uniform(0, 255, 3) + 0.5 * rng.uniform(60, 200)
    c2 = 0.5 * rng.uniform(0, 255, 3) + 0.5 * rng.uniform(60, 200)
    kind = rng.integers(3)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    if kind == 0:  # vertical gradient
        img = np.broadcast_to(c1 * (1 - t) + c2 * t, (size, size, 3))
    elif kind == 1:  # flat colour with coarse blotches
        coarse = Image.fromarray(np.clip(rng.normal(128, 25, (6, 6, 3)), 0, 255).astype(np.uint8))
        blot = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32) - 128
        img = c1[None, None, :] + blot
    else:  # "sky" above a "road"
        horizon = int(size * rng.uniform(0.45, 0.75))
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:horizon] = c1 * (1 - t[:horizon] * 0.5)
        img[horizon:] = rng.uniform(70, 140)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_car(
    rng: np.random.Generator, brand: str, model: str, year_start: int, img_size: int
) -> Image.Image:
    """Draw one side-view car photo with random nuisances; returns RGB img_size x img_size.

    The class cues (palette, badge, silhouette, headlight/roof rail/window trim) are fixed by
    ``brand``/``model``/``year_start``; everything else (background, pose, scale,
    flip, lighting, noise) is drawn from ``rng`` so the model cannot shortcut them.
    Pose (rotation, flip) is applied to the drawing coordinates rather than to a
    bitmap, which keeps a 128 px image at a few milliseconds.
    """
    if brand not in _BRANDS:
        raise ValueError(f"unknown brand {brand!r}; expected one of {sorted(_BRANDS)}")
    if model not in _MODELS or _MODELS[model][0] != brand:
        known = [m for m, (b, _, _) in _MODELS.items() if b == brand]
        raise ValueError(f"unknown model {model!r} for brand {brand!r}; expected one of {known}")
    palette, badge = _BRANDS[brand]
    shape = _SHAPES[_MODELS[model][1]]
    new_style = year_start >= NEW_STYLE_FROM

    # Background at the output size, upscaled with NEAREST: the final BOX
    # downscale then restores it exactly, at a quarter of the cost.
    S = img_size * _SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, img_size), "RGB").resize((S, S), Image.NEAREST)
    d = ImageDraw.Draw(canvas)

    # Placement: car length 50-90 % of the width, anywhere it fits; then pose.
    length = S * rng.uniform(0.5, 0.9)
    margin = 0.03 * S
    x0 = rng.uniform(margin, max(margin, S - length - margin))
    ground = rng.uniform(0.55 * S, 0.95 * S)
    ground = max(ground, 0.62 * length + margin)  # keep the roof inside the frame
    angle = np.deg2rad(rng.uniform(-6.0, 6.0))
    flip = rng.random() < 0.5
    ca, sa = float(np.cos(angle)), float(np.sin(angle))
    cx0, cy0 = x0 + 0.5 * length, ground - 0.25 * length  # rotation centre

    def P(x: float, y: float) -> tuple[float, float]:
        """Car units -> canvas pixels, including rotation and flip."""
        px, py = x0 + x * length - cx0, ground - y * length - cy0
        px, py = ca * px - sa * py + cx0, sa * px + ca * py + cy0
        return (S - px if flip else px, py)

    def rect(xa: float, ya: float, xb: float, yb: float, **kw: Any) -> None:
        d.polygon([P(xa, ya), P(xb, ya), P(xb, yb), P(xa, yb)], **kw)

    def circle(x: float, y: float, r: float, **kw: Any) -> None:
        cx, cy = P(x, y)
        rp = r * length
        d.ellipse([cx - rp, cy - rp, cx + rp, cy + rp], **kw)

    base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64)
    body = tuple(int(v) for v in np.clip(base + rng.normal(0, 10, 3), 0, 255))
    dark = tuple(int(v * 0.55) for v in body)
    black = (25, 25, 25)
    lw = max(1, int(round(length / 160)))

    # Roof rail (new style): drawn first so the roof edge covers its base.
    if new_style:
        rx0, rx1, ry = shape["roof"]
        rect(rx0 + 0.02, ry + 0.035, rx1 - 0.02, ry + 0.02, fill=black)
        for px in (rx0 + 0.03, rx1 - 0.03):
            rect(px - 0.008, ry + 0.03, px + 0.008, ry, fill=black)

    d.polygon([P(*p) for p in shape["body"]], fill=body, outline=dark, width=lw)
    glass = tuple(int(v) for v in rng.uniform(40, 90, 3))
    # Window trim is a year cue: chrome on new cars, black rubber on old ones.
    trim = (225, 225, 230) if new_style else black
    d.polygon([P(*p) for p in shape["window"]], fill=glass, outline=trim, width=2 * lw)
    # B-pillar splits the glass into two windows.
    wx = [p[0] for p in shape["window"]]
    wy = [p[1] for p in shape["window"]]
    bx = (min(wx) + max(wx)) / 2
    rect(bx - 0.012, max(wy), bx + 0.012, min(wy), fill=body)

    belt = shape["belt"]
    wx0, wx1, wr = shape["wheels"]
    # Door line and handle.
    d.line([P(bx, belt + 0.01), P(bx, wr + 0.06)], fill=dark, width=lw)
    rect(bx + 0.04, belt - 0.03, bx + 0.09, belt - 0.045, fill=dark)

    # Brand badge on the front door: light fill, dark rim, readable on any body colour.
    bxc, byc, br = bx + 0.15, belt - 0.09, 0.04
    light, blw = (235, 235, 235), max(2, lw)
    if badge == "circle":
        circle(bxc, byc, br, fill=light, outline=black, width=blw)
    elif badge == "triangle":
        pts = [(bxc, byc + br * 1.15), (bxc + br * 1.1, byc - br * 0.8), (bxc - br * 1.1, byc - br * 0.8)]
        d.polygon([P(*p) for p in pts], fill=light, outline=black, width=blw)
    else:
        rect(bxc - br * 0.9, byc + br * 0.9, bxc + br * 0.9, byc - br * 0.9,
             fill=light, outline=black, width=blw)

    # Headlight at the front (x = 1): round (old) vs. slit (new).
    hy = belt - (0.08 if shape is _SHAPES["suv"] else 0.06)
    lamp = (255, 245, 190)
    if new_style:
        rect(0.905, hy + 0.012, 0.995, hy - 0.012, fill=lamp, outline=black, width=lw)
    else:
        circle(0.955, hy, 0.035, fill=lamp, outline=black, width=lw)
    rect(0.0, hy + 0.03, 0.025, hy - 0.03, fill=(180, 0, 0))  # tail light

    # Wheels: tyre + rim.
    for wxc in (wx0, wx1):
        circle(wxc, wr, wr, fill=(20, 20, 20))
        circle(wxc, wr, wr * 0.55, fill=(170, 170, 175))

    img = canvas.resize((img_size, img_size), Image.BOX)

    # Photometric jitter and sensor noise.
    arr = np.asarray(img, dtype=np.float32)
    contrast = rng.uniform(0.75, 1.25)
    brightness = rng.uniform(-25, 25)
    arr = (arr - 128.0) * contrast + (128.0 + brightness)
    arr += rng.normal(0, 3.0, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _save_jpeg(img: Image.Image, path: Path, quality: int = 90) -> None:
    """Write via an in-memory buffer so partial files never land on disk."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    path.write_bytes(buf.getvalue())


