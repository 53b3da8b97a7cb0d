"""``hier audit``: what is wrong with a labelled dataset, found before a model learns it.

Label noise costs a fine-grained model more than a few missing photos: one photo filed under two
classes teaches it that they are the same car, copies of one photo inflate a class and leak between
train and validation, and interiors, keys or a different car under a class name drag its mean away.
The audit finds, per class and across classes:

- exact duplicates (MD5 of the file's bytes); a group spanning two or more classes is a label error;
- near-duplicates (the same photo resized, recropped or recompressed): embedding cosine >= ``near``,
  found by a FAISS range search, with an artifact's embeddings or, without one, the offline ImageNet
  ``efficientnet_lite0`` trunk's pooled features. 0.93 by default, measured with that trunk on the
  Stanford dev photos: copies recompressed at JPEG quality 60 or upscaled 1.5x score 0.95-0.99, the
  same press photo filed under two classes 0.93-0.99, while 0.97 (the first guess) missed three of
  those four; a trained artifact's embeddings gather a class tighter, so give it a higher ``near``;
- outliers: a low cosine to the mean of the rest of the class, judged by a robust (median/MAD)
  z-score within the class, so a class of varied photos does not flag more than a uniform one;
- unreadable, non-image and too-large files (the readers skip them; here each is listed).

It writes ``OUT/audit.html`` (built like ``hier report``: a temporary folder sealed with a marker and
moved into place, an ``OUT`` that is not an earlier audit refused), ``audit.json``, the PNG figures, a
contact sheet of the outliers, and ``exclude.txt``: the paths (relative to DATA) training should drop,
read back by ``read_exclude`` / ``apply_exclude``."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image, ImageDraw, ImageFont

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hier import fileio  # noqa: E402
from hier.data import OK, Crop, ImageSet, check_images, pil_rgb, walk_files  # noqa: E402
from hier.data.readers import create_reader, detect_layout, LAYOUTS  # noqa: E402
from hier.data.tables import decode_text  # noqa: E402
from hier.errors import HierError, check_number  # noqa: E402
from hier.report import build  # noqa: E402

MARKER = ".hier-audit"
OUTLIER_Z = -3.5            # modified z-score below which a photo is flagged (Iglewicz & Hoaglin)
MIN_CLASS = 5               # fewer photos than this: no robust spread to judge an outlier by
SHOWN = 30                  # duplicate groups and near pairs drawn on the page (all are in audit.json)
NEAR_KEPT = 10_000          # near pairs listed in audit.json (all are counted)


def audit(data: str | Path, out: str | Path, artifact: str | Path | None = None, layout: str = "auto",
          near: float = 0.93, outliers: int = 48, exclude_outliers: int = 0, exclude_near: bool = False,
          write_exclude: str | Path | None = None, force: bool = False, batch_size: int = 64,
          progress=None) -> dict:
    """Audit the labelled photos at ``data`` into ``out``; returns what ``audit.json`` holds. Every flag,
    ``out`` and ``write_exclude`` are checked before any photo is read."""
    near = check_number("--near", near, 0.5, 1.0)
    outliers = check_number("--outliers", outliers, 0, 10_000, integer=True)
    exclude_outliers = check_number("--exclude-outliers", exclude_outliers, 0, 10**9, integer=True)
    batch_size = check_number("--batch-size", batch_size, 1, 4096, integer=True)
    if layout not in LAYOUTS:
        raise HierError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    data, given = Path(data), out
    if not data.is_dir():
        raise HierError(f"data folder not found: {data}")
    out = build._target(out, data, artifact, MARKER)
    if out.is_relative_to(data.resolve()):
        raise HierError(f"--out {given} is inside the data folder {data} (it would be read as a class); "
                        "choose a folder outside it")
    _writable(out, given)
    exclude_file = _exclude_target(write_exclude, out, force) if write_exclude is not None else None
    rec = None
    if artifact is not None:
        from hier.recognizer import Recognizer
        rec = Recognizer(artifact, batch_size=batch_size)      # refuses a folder that is not an artifact

    images, _ = create_reader(data, layout)()
    rejected = rejected_files(data, images, detect_layout(data) if layout == "auto" else layout)
    files = file_table(data, images, progress)
    z = embed(images.paths, rec, batch_size, progress)
    result = find(files, z, near)
    ranked = result["ranked_outliers"]
    listed = exclude_list(result["exact"], ranked[:exclude_outliers], result["near"] if exclude_near else [])
    report = {
        "data": str(data), "artifact": str(artifact) if artifact else None,
        "embedding": "artifact" if artifact else "ImageNet efficientnet_lite0 (offline)",
        "near_threshold": near, "outlier_z": OUTLIER_Z,
        "counts": _counts(files, result, rejected, listed),
        "skipped": images.skipped_message(),
        "classes": _per_class(files, result),
        "exact_duplicates": result["exact"],
        "near_duplicates": result["near"][:NEAR_KEPT],
        "outliers": ranked[:max(outliers, exclude_outliers)],
        "unreadable": rejected,
        "exclude": {"file": str(write_exclude) if write_exclude is not None else None, "paths": len(listed),
                    "outliers_listed": min(exclude_outliers, len(ranked)), "near_cross_class": exclude_near},
    }
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        _write(tmp, data, files, images, report, listed, outliers)
        build._seal(tmp, MARKER)
        build._swap(tmp, out, given, MARKER)
    except OSError as e:
        raise HierError(f"could not write the audit ({e.strerror or e}{f': {e.filename}' if e.filename else ''}); "
                        f"{given} is as it was") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if exclude_file is not None:
        _write_exclude(exclude_file, listed, force, write_exclude)
    return report


def _writable(out: Path, given) -> None:
    """Refuse, before minutes of embedding, an ``out`` whose nearest existing folder is a file or not
    writable (the audit is built beside ``out``)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HierError(f"--out {given}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HierError(f"--out {given}: folder {parent} is not writable; choose another --out")


# --- reading: the files the reader left out, and every kept photo's bytes, size and brightness --------

def _path(item) -> Path:
    return item.path if isinstance(item, Crop) else Path(item)


def rejected_files(data: Path, images: ImageSet, layout: str) -> list[dict]:
    """The files of the layout the reader did not keep, each with why (``check_image``'s reason): the
    reader only counts them."""
    if layout == "aihub":
        candidates = [p for p in walk_files(data) if p.suffix.lower() != ".json" and len(p.relative_to(data).parts) >= 4]
    else:
        candidates = sorted(p for d in data.iterdir() if d.is_dir() and not d.name.startswith(".")
                            for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = {_path(p) for p in images.paths}
    rest = [p for p in candidates if p not in kept]
    return [{"path": p.relative_to(data).as_posix(), "reason": s if s != OK else "left out by the reader"}
            for p, s in zip(rest, check_images(rest))]


def _read_one(path: Path) -> tuple[str, int, int, int, float]:
    """(MD5, bytes, upright width, height, mean luminance 0..255) from one read of the file."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):      # EXIF orientation: stored sideways
            w, h = h, w
        im.draft("RGB", (64, 64))                           # JPEG decoded at 1/8: brightness needs no more
        rgb = pil_rgb(im).astype(np.float32)
    return hashlib.md5(raw).hexdigest(), len(raw), w, h, float((rgb @ [0.299, 0.587, 0.114]).mean())


def file_table(data: Path, images: ImageSet, progress=None) -> pd.DataFrame:
    """One row per kept photo: path (relative to ``data``), class, md5, bytes, width, height, brightness."""
    paths = [_path(p) for p in images.paths]
    task = progress.add_task("read", total=len(paths), info="") if progress else None

    def one(p: Path):
        try:
            row = _read_one(p)
        except (OSError, ValueError, SyntaxError) as e:
            raise HierError(f"cannot read {p} ({getattr(e, 'strerror', None) or e}); did it change during the audit?") \
                from None
        if progress:
            progress.advance(task)
        return row

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(one, paths))
    table = pd.DataFrame(rows, columns=["md5", "bytes", "width", "height", "brightness"])
    table.insert(0, "class", images.labels)
    table.insert(0, "path", [p.relative_to(data).as_posix() for p in paths])
    return table


# --- embeddings ---------------------------------------------------------------------------------------

def imagenet_net():
    """The offline ImageNet ``efficientnet_lite0`` whose embedding is its pooled 1280 features: no
    untrained projection in between, which would only blur the cosines duplicates are judged by."""
    import torch
    from hier.models import HierNet, ModelConfig
    from hier.taxonomy import Taxonomy

    one = Taxonomy(pd.DataFrame([{"class": "photo", "brand": "photo", "model": "photo",
                                  "year_start": 2000, "year_end": 2000}]))
    net = HierNet(ModelConfig(trunk="efficientnet_lite0", embed_dim=1280), one, pretrained="efficientnet_lite0")
    net.neck = torch.nn.Identity()
    return net.eval()


def embed(items: list, rec=None, batch_size: int = 64, progress=None) -> np.ndarray:
    """Unit embeddings (N, D) through the one ``Predictor``: the artifact's (``rec``) or the ImageNet trunk's."""
    if rec is not None:
        return rec.embed(items, progress)["embedding"]
    from hier.engine.predictor import Predictor
    return Predictor(imagenet_net(), batch_size=batch_size)(items, progress, keep=("embedding",))["embedding"]


# --- what is found ------------------------------------------------------------------------------------

def find(files: pd.DataFrame, z: np.ndarray, near: float) -> dict:
    """Exact duplicate groups, near-duplicate pairs, and every photo's outlier score, ranked."""
    exact = exact_duplicates(files)
    pairs = near_duplicates(z, near)
    md5 = files["md5"].to_numpy()
    paths, classes = files["path"].tolist(), files["class"].tolist()
    near_rows = [{"a": paths[i], "b": paths[j], "class_a": classes[i], "class_b": classes[j],
                  "cosine": round(float(s), 4), "cross_class": classes[i] != classes[j]}
                 for i, j, s in pairs if md5[i] != md5[j]]           # identical bytes are exact duplicates
    cos, score = outlier_scores(z, files["class"].to_numpy())
    order = np.lexsort((cos, np.where(np.isnan(score), np.inf, score)))      # lowest z first, nan last
    ranked = [{"path": paths[i], "class": classes[i], "cosine": round(float(cos[i]), 4),
               "z": round(float(score[i]), 2),
               "flagged": bool(score[i] < OUTLIER_Z)} for i in order if not np.isnan(score[i])]
    return {"exact": exact, "near": near_rows, "cosine": cos, "z": score, "ranked_outliers": ranked}


def exact_duplicates(files: pd.DataFrame) -> list[dict]:
    """Groups of photos with identical bytes, paths sorted (the first is the copy kept), cross-class
    groups (label errors) first."""
    groups = []
    for md5, g in files.groupby("md5", sort=False):
        if len(g) > 1:
            g = g.sort_values("path")
            groups.append({"md5": md5, "paths": g["path"].tolist(), "classes": g["class"].tolist(),
                           "cross_class": g["class"].nunique() > 1})
    return sorted(groups, key=lambda g: (not g["cross_class"], g["paths"][0]))


def near_duplicates(z: np.ndarray, near: float) -> list[tuple[int, int, float]]:
    """Pairs (i < j, cosine) with cosine >= ``near``, most similar first: one FAISS range search of the
    unit embeddings against themselves (inner product = cosine), all in C."""
    import faiss
    z = np.ascontiguousarray(z, dtype=np.float32)
    index = faiss.IndexFlatIP(z.shape[1])
    index.add(z)
    lims, sims, found = index.range_search(z, float(np.nextafter(np.float32(near), np.float32(-1))))  # faiss: > r
    query = np.repeat(np.arange(len(z)), np.diff(lims).astype(np.int64))
    keep = (query < found) & (sims >= np.float32(near))
    order = np.argsort(-sims[keep], kind="stable")
    return [(int(i), int(j), float(s)) for i, j, s in
            zip(query[keep][order], found[keep][order], sims[keep][order])]


def outlier_scores(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per photo: cosine to the mean of the *other* photos of its class (an outlier does not pull its
    own reference), and the modified z-score of that cosine within the class, 0.6745 (c - median) / MAD;
    nan in classes of fewer than ``MIN_CLASS`` photos."""
    cos, score = np.full(len(z), np.nan), np.full(len(z), np.nan)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        rest = z[idx].sum(0, keepdims=True) - z[idx]
        cos[idx] = (z[idx] * rest).sum(1) / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
        if len(idx) >= MIN_CLASS:
            med = np.median(cos[idx])
            mad = max(float(np.median(np.abs(cos[idx] - med))), 1e-6)
            score[idx] = 0.6745 * (cos[idx] - med) / mad
    return cos, score


def exclude_list(exact: list[dict], outliers: list[dict], near: list[dict] = ()) -> list[str]:
    """What training should drop: the later copies of a within-class duplicate, every photo of a
    cross-class group (which label is right is for a person to say), the given outliers, and both
    photos of each cross-class pair in ``near``."""
    drop = set()
    for g in exact:
        drop.update(g["paths"] if g["cross_class"] else g["paths"][1:])
    drop.update(o["path"] for o in outliers)
    drop.update(p for r in near if r["cross_class"] for p in (r["a"], r["b"]))
    return sorted(drop)


def _counts(files: pd.DataFrame, result: dict, rejected: list, listed: list) -> dict:
    within = [g for g in result["exact"] if not g["cross_class"]]
    cross = [g for g in result["exact"] if g["cross_class"]]
    near = result["near"]
    return {"images": len(files), "classes": int(files["class"].nunique()), "unreadable": len(rejected),
            "exact_groups": len(within), "exact_extra_copies": sum(len(g["paths"]) - 1 for g in within),
            "cross_class_groups": len(cross), "cross_class_files": sum(len(g["paths"]) for g in cross),
            "near_pairs": len(near), "near_cross_class_pairs": sum(p["cross_class"] for p in near),
            "near_photos": len({p for r in near for p in (r["a"], r["b"])}),
            "outliers": sum(o["flagged"] for o in result["ranked_outliers"]), "excluded": len(listed)}


def _per_class(files: pd.DataFrame, result: dict) -> list[dict]:
    dup = {p for g in result["exact"] for p in g["paths"]}
    near = {p for r in result["near"] for p in (r["a"], r["b"])}
    flagged = {o["path"] for o in result["ranked_outliers"] if o["flagged"]}
    rows = []
    for c, g in files.groupby("class", sort=True):
        rows.append({"class": c, "images": len(g), "median_width": int(g["width"].median()),
                     "median_height": int(g["height"].median()), "brightness": round(float(g["brightness"].mean()), 1),
                     "exact_duplicates": int(g["path"].isin(dup).sum()), "near_duplicates": int(g["path"].isin(near).sum()),
                     "outliers": int(g["path"].isin(flagged).sum())})
    return rows


# --- the exclude file ---------------------------------------------------------------------------------

def _exclude_target(path: str | Path, out: Path, force: bool) -> Path:
    """``--write-exclude``'s file, checked before any work: never an existing file unless ``force``,
    never inside ``--out`` (replaced by the next audit)."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if real.is_relative_to(out):
        raise HierError(f"--write-exclude {path} is inside --out (the next audit replaces it); write it elsewhere")
    if real.is_dir():
        raise HierError(f"--write-exclude {path} is a folder; give a file name")
    if real.exists() and not force:
        raise HierError(f"--write-exclude {path} exists; refused to overwrite it (pass --force to replace it)")
    if not real.parent.is_dir():
        raise HierError(f"--write-exclude {path}: folder {path.parent} does not exist")
    if not os.access(real.parent, os.W_OK):
        raise HierError(f"--write-exclude {path}: folder {path.parent} is not writable")
    return real


def _write_exclude(path: Path, listed: list[str], force: bool, given) -> None:
    text = "".join(f"{p}\n" for p in listed)
    try:
        if force:
            fileio.atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
        else:
            with open(path, "x", encoding="utf-8") as f:      # "x": a file that appeared meanwhile is kept
                f.write(text)
    except FileExistsError:
        raise HierError(f"--write-exclude {given} appeared during the audit; refused to overwrite it "
                        "(pass --force to replace it)") from None
    except OSError as e:
        raise HierError(f"could not write --write-exclude {given} ({e.strerror or e}); the audit itself is written") \
            from None


def _key(path: str | Path) -> str:
    """How a photo's path is compared: normalised separators and dots, Unicode NFC (a Mac's NFD names)."""
    return unicodedata.normalize("NFC", os.path.normpath(str(path)))


def read_exclude(path: str | Path, data_dir: str | Path) -> set[str]:
    """The paths an exclude file lists (one per line, relative to ``data_dir``; blank lines and ``#``
    comments ignored), joined to ``data_dir`` and normalised as ``apply_exclude`` compares them."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise HierError(f"exclude file {path} is a folder") from None
    except OSError as e:
        raise HierError(f"cannot read exclude file {path} ({e.strerror or e})") from None
    text, _ = decode_text(raw, str(path))
    names = (line.strip() for line in text.splitlines())
    return {_key(Path(data_dir) / n) for n in names if n and not n.startswith("#")}


def apply_exclude(images: ImageSet, paths: set[str]) -> tuple[ImageSet, int]:
    """``images`` without the photos ``paths`` (from ``read_exclude``) names, and how many names are
    not among them: a list written for other data, or files since removed (the trainer says so)."""
    keys = [_key(_path(p)) for p in images.paths]
    keep = [i for i, k in enumerate(keys) if k not in paths]

    def pick(values):
        return None if values is None else [values[i] for i in keep]

    kept = dataclasses.replace(images, paths=pick(images.paths), labels=pick(images.labels), ids=pick(images.ids),
                               skipped=images.skipped.copy())
    return kept, len(paths - set(keys))


# --- the page -----------------------------------------------------------------------------------------

def _strip(items: list, size: int = 160) -> Image.Image:
    panels = [build._thumb(p, size) for p in items]
    strip = Image.new("RGB", (sum(im.width for im in panels) + 8 * (len(panels) - 1), max(im.height for im in panels)),
                      "white")
    x = 0
    for im in panels:
        strip.paste(im, (x, 0))
        x += im.width + 8
    return strip


def _write(tmp: Path, data: Path, files: pd.DataFrame, images: ImageSet, report: dict, listed: list[str],
           shown_outliers: int) -> None:
    page = build._Page(tmp)
    item = dict(zip(files["path"], images.paths))          # a Crop is drawn as its box
    page.figure("counts.png", _plot_counts, files)
    page.figure("sizes.png", _plot_sizes, files)
    page.figure("brightness.png", _plot_brightness, files)
    exact = [dict(g, png=page.image(f"thumbs/exact{k}.jpg", _strip([item[p] for p in g["paths"][:4]])))
             for k, g in enumerate(report["exact_duplicates"][:SHOWN])]
    near = [dict(r, png=page.image(f"thumbs/near{k}.jpg", _strip([item[r["a"]], item[r["b"]]])))
            for k, r in enumerate(sorted(report["near_duplicates"], key=lambda r: not r["cross_class"])[:SHOWN])]
    sheet = report["outliers"][:shown_outliers]
    small = [build._thumb(item[o["path"]], 160) for o in sheet]
    thumbs = [dict(o, png=page.image(f"thumbs/outlier{k}.jpg", im)) for k, (o, im) in enumerate(zip(sheet, small))]
    if sheet:
        page.figures["outliers"] = page.image("outliers.png", _contact_sheet(small, sheet))
    (tmp / "exclude.txt").write_text("".join(f"{p}\n" for p in listed), encoding="utf-8")
    (tmp / "audit.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=float), encoding="utf-8")
    env = Environment(loader=FileSystemLoader(Path(build.__file__).parent), autoescape=select_autoescape(["html"]))
    html = env.get_template("audit.html").render(r=report, c=report["counts"], exact=exact, near=near,
                                                 outliers=thumbs, figures=page.figures, shown=SHOWN)
    (tmp / "audit.html").write_text(html, encoding="utf-8")


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
    from matplotlib import font_manager
    try:
        font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11)
    except OSError:
        font = ImageFont.load_default()
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
