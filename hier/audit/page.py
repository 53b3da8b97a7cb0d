"""The audit's page: ``audit.html`` with its figures and the outliers' contact sheet."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image, ImageDraw, ImageFont

from hier.data import ImageSet
from hier.drawing import CSS_MARK, hangul_css, hangul_font, pyplot
from hier.report import build

plt = pyplot()

SHOWN = 30                  # duplicate groups and near pairs drawn on the page (all are in audit.json)


def _strip(items: list, size: int = 160) -> Image.Image:
    panels = [build.thumbnail(p, size) for p in items]
    strip = Image.new("RGB", (sum(im.width for im in panels) + 8 * (len(panels) - 1), max(im.height for im in panels)),
                      "white")
    x = 0
    for im in panels:
        strip.paste(im, (x, 0))
        x += im.width + 8
    return strip


def write_page(tmp: Path, data: Path, files: pd.DataFrame, images: ImageSet, report: dict, listed: list[str],
           shown_outliers: int) -> None:
    page = build.Page(tmp)
    item = dict(zip(files["path"], images.paths))          # a Crop is drawn as its box
    page.figure("counts.png", _plot_counts, files)
    page.figure("sizes.png", _plot_sizes, files)
    page.figure("brightness.png", _plot_brightness, files)
    exact = [dict(g, png=page.image(f"thumbs/exact{k}.jpg", _strip([item[p] for p in g["paths"][:4]])))
             for k, g in enumerate(report["exact_duplicates"][:SHOWN])]
    near = [dict(r, png=page.image(f"thumbs/near{k}.jpg", _strip([item[r["a"]], item[r["b"]]])))
            for k, r in enumerate(sorted(report["near_duplicates"], key=lambda r: not r["cross_class"])[:SHOWN])]
    sheet = report["outliers"][:shown_outliers]
    small = [build.thumbnail(item[o["path"]], 160) for o in sheet]
    thumbs = [dict(o, png=page.image(f"thumbs/outlier{k}.jpg", im)) for k, (o, im) in enumerate(zip(sheet, small))]
    if sheet:
        page.figures["outliers"] = page.image("outliers.png", _contact_sheet(small, sheet))
    (tmp / "exclude.txt").write_text("".join(f"{p}\n" for p in listed), encoding="utf-8")
    (tmp / "audit.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=float), encoding="utf-8")
    env = Environment(loader=FileSystemLoader(Path(build.__file__).parent), autoescape=select_autoescape(["html"]))
    html = env.get_template("audit.html").render(r=report, c=report["counts"], exact=exact, near=near,
                                                 outliers=thumbs, figures=page.figures, shown=SHOWN)
    (tmp / "audit.html").write_text(html.replace(CSS_MARK, hangul_css(html), 1), encoding="utf-8")


def _plot_counts(files: pd.DataFrame):
    counts = files["class"].value_counts().sort_values()
    if len(counts) <= 120:
        fig, ax = plt.subplots(figsize=(7, max(3, 0.16 * len(counts) + 1)))
        ax.barh(range(len(counts)), counts.to_numpy(), color="#4a7fb5")
        ax.set_yticks(range(len(counts)), counts.index.tolist(), fontsize=6)
        ax.set_xlabel("photos")
        ax.margins(y=0.005)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(counts.to_numpy(), bins=40, color="#4a7fb5")
        ax.set_xlabel("photos per class")
        ax.set_ylabel("classes")
    ax.set_title(f"{len(files)} photos in {len(counts)} classes (min {counts.min()}, median "
                 f"{int(counts.median())}, max {counts.max()})")
    return fig


def _plot_sizes(files: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(files["width"], files["height"], s=6, alpha=0.4, color="#4a7fb5")   # linear: log ticks are mathtext,
    ax.set_xlim(left=0)                                                             # which the page turns off
    ax.set_ylim(bottom=0)
    ax.set_xlabel("width (px, upright)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"image sizes: median {int(files['width'].median())} x {int(files['height'].median())}")
    ax.grid(alpha=0.3)
    return fig


def _plot_brightness(files: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(files["brightness"], bins=50, range=(0, 255), color="#4a7fb5")
    ax.set_xlabel("mean luminance (0-255)")
    ax.set_ylabel("photos")
    ax.set_title(f"brightness: median {files['brightness'].median():.0f}")
    return fig


def _contact_sheet(thumbs: list[Image.Image], shown: list[dict], cols: int = 8, cell: int = 160) -> Image.Image:
    """The outliers on one PNG, most outlying first, each captioned with its rank, class, cosine and
    z-score (red: flagged). Drawn with PIL: a matplotlib grid of 48 axes took seconds to lay out."""
    font = ImageFont.truetype(str(hangul_font()), 11)
    rows, caption = -(-len(shown) // cols), 30
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + caption + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, o) in enumerate(zip(thumbs, shown)):
        x, y = 8 + (k % cols) * (cell + 8), 8 + (k // cols) * (cell + caption + 8)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        name = o["class"] if len(o["class"]) <= 24 else o["class"][:23] + "…"
        draw.text((x, y + cell + 2), f"{k + 1}. {name}\ncos {o['cosine']:.2f}  z {o['z']:.1f}", font=font,
                  fill="#b00020" if o["flagged"] else "#1d2329")
    return sheet
