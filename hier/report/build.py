"""``hier report``: one self-contained HTML page (+ PNGs and metrics.json) judging an artifact on
labelled photos: per-level accuracy and log loss, worst classes, most confused pairs (side by side,
same-model-other-years flagged), brand and top-confused fine confusion matrices, reliability before and
after temperature, coverage vs precision with back-off from year to model to brand, and class-activation
maps of right and wrong answers. Built in a temporary folder and moved into place whole.

``--out`` is replaced only when it is an earlier hier report: every report carries a marker
(``.hier-report``: hier's version and the files it wrote), and a folder without it, or holding anything
the marker does not list, is refused rather than deleted."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, log_loss

from hier import outputs
from hier.artifact.files import CURVES, MEMBERS, is_ensemble
from hier.artifact.records import read_run
from hier.data import to_rgb
from hier.data.readers import create_reader
from hier.drawing import CSS_MARK, hangul_css, pyplot
from hier.errors import HierError
from hier.metrics import ECE_BINS, answer, calibration_bins, ece, evaluate_probs, softmax
from hier.report.cam import grad_cam, overlay

plt = pyplot()

THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.05), 2)
LEVELS = ("fine", "model", "brand")


def report(rec, data: str | Path, out: str | Path, layout: str = "auto", cams: int = 6, pairs: int = 12,
           progress=None) -> dict:
    """Write ``out/index.html``, its PNGs and ``metrics.json``; returns the metrics. Photos of classes
    the artifact does not know are left out (and counted); none in common is an error. ``out`` is
    checked before any work (``_target``) and replaced only once the new report is complete."""
    given = out
    out = outputs.target(out, data, rec.path, MARKER)
    images, _ = create_reader(data, layout)()
    tax = rec.taxonomy
    known = [i for i, c in enumerate(images.labels) if c in tax]
    if not known:
        raise HierError(f"no class of {data} is in the artifact's taxonomy ({len(set(images.labels))} classes, "
                        f"e.g. {images.labels[0]!r}); is it the right artifact?")
    paths = [images.paths[i] for i in known]
    labels = [images.labels[i] for i in known]
    scores, snap = rec._embed(paths, progress)         # the taxonomy of the very weights that answered
    tax = snap.taxonomy
    y = np.array([tax.class_index[c] for c in labels])
    probs, logits = scores["probs"], scores["joint"]

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))     # nothing half-written in out
        metrics = _write(rec.path, snap, data, tmp, images, paths, probs, logits, y, cams, pairs)
        outputs.seal(tmp, MARKER)
        outputs.swap(tmp, out, given, MARKER)
    except OSError as e:         # disk full, read-only or unwritable folder: out is as it was
        raise HierError(f"could not write the report ({e.strerror or e}{f': {e.filename}' if e.filename else ''}); "
                        f"{given} is as it was") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def in_training_folder(artifact_dir: Path, paths: list) -> int:
    """How many of ``paths`` lie in a folder the artifact (an ensemble: any member) was trained from
    (``train.json``): figures on photos it trained on flatter it, so the report says so. A train.json
    that does not say (an older, damaged or hand-made one) counts nothing."""
    members = artifact_dir / MEMBERS
    runs = [read_run(m) for m in sorted(members.iterdir())] if is_ensemble(artifact_dir) and members.is_dir() \
        else [read_run(artifact_dir)]
    folders = [run["data"] for run in runs if isinstance(run, dict) and isinstance(run.get("data"), str)]
    folders = [f for f in folders if Path(f).is_dir()]
    return sum(any(outputs.is_inside(p, f) for f in folders) for p in paths if isinstance(p, (str, Path))) \
        if folders else 0


# --- where the report goes: only an absent or empty folder, or an earlier hier report, is replaced ------
MARKER = ".hier-report"


def _write(artifact_dir: Path, snap, data, tmp: Path, images, paths, probs, logits, y, cams: int, pairs: int) -> dict:
    page, tax = Page(tmp), snap.taxonomy
    metrics = _metrics(probs, logits, y, tax)
    metrics["images"], metrics["unknown_class_images"] = len(y), len(images.paths) - len(y)
    metrics["skipped"], metrics["temperature"] = images.skipped_message(), snap.net.cfg.temperature
    metrics["in_training_folder"] = in_training_folder(artifact_dir, paths)
    classes = _per_class(probs, y, tax)
    confused = _confused_pairs(probs, y, tax, paths, page, pairs)
    page.figure("confusion_brand.png", _confusion_brand, probs, y, tax)
    page.figure("confusion_fine_block.png", _confusion_block, probs, y, tax, confused)
    page.figure("reliability.png", _reliability, logits, probs, y, snap.net.cfg.temperature)
    if (artifact_dir / CURVES).is_file():           # how the artifact trained, drawn by `hier train`
        shutil.copyfile(artifact_dir / CURVES, tmp / CURVES)
        page.figures["curves"] = CURVES
    coverage = _coverage(probs, y, tax)
    page.figure("coverage.png", _plot_coverage, coverage)
    examples = _cams(snap.net, paths, probs, y, tax, page, cams)
    metrics.update(worst_classes=classes[:15], confused_pairs=[{k: v for k, v in p.items() if k != "png"}
                                                               for p in confused], coverage=coverage)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False, default=float),
                                      encoding="utf-8")
    html = _template().render(artifact=str(artifact_dir), data=str(data), m=metrics, classes=classes[:15],
                              pairs=confused, examples=examples, figures=page.figures, levels=LEVELS)
    (tmp / "index.html").write_text(html.replace(CSS_MARK, hangul_css(html), 1), encoding="utf-8")
    return metrics


class Page:
    """The report folder being written: figures and thumbnails by name."""

    def __init__(self, root: Path):
        self.root, self.figures = root, {}

    def figure(self, name: str, draw, *args) -> None:
        """Drawn and saved with mathtext off: class names are text (``M$\\frac$ 2024``), not TeX."""
        with plt.rc_context({"text.parse_math": False}):
            fig = draw(*args)
            try:
                fig.savefig(self.root / name, dpi=110, bbox_inches="tight")
            finally:
                plt.close(fig)
        self.figures[name.removesuffix(".png")] = name

    def image(self, name: str, picture: Image.Image) -> str:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        picture.save(self.root / name)
        return name


def _metrics(probs, logits, y, tax) -> dict:
    m = evaluate_probs(probs, y, tax, logits=logits)
    model_p, brand_p = tax.marginals(probs)
    m["model_log_loss"] = float(log_loss(tax.fine_to_model[y], model_p, labels=np.arange(len(tax.models))))
    m["brand_log_loss"] = float(log_loss(tax.fine_to_brand[y], brand_p, labels=np.arange(len(tax.brands))))
    return m


def _per_class(probs, y, tax) -> list[dict]:
    """Classes by accuracy, worst first, with their most frequent wrong answer."""
    pred = answer(probs, tax)[2]
    rows = []
    for c in np.unique(y):
        hit = pred[y == c] == c
        wrong = pred[(y == c) & (pred != c)]
        rows.append({"class": tax.classes[c], "images": int(hit.size), "accuracy": float(hit.mean()),
                     "mostly_taken_for": tax.classes[np.bincount(wrong).argmax()] if wrong.size else ""})
    return sorted(rows, key=lambda r: (r["accuracy"], -r["images"]))


def thumbnail(path, size: int = 160) -> Image.Image:
    im = Image.fromarray(to_rgb(path, size))
    im.thumbnail((size, size))
    return im


def _confused_pairs(probs, y, tax, paths, page: Page, n: int) -> list[dict]:
    """The n most frequent (true, answered) pairs, each with a photo of the true class taken for the
    other beside a photo of the other class (when the data has one). Same model, other years: flagged."""
    pred = answer(probs, tax)[2]
    wrong = pred != y
    pairs, counts = np.unique(np.stack([y[wrong], pred[wrong]], 1), axis=0, return_counts=True) \
        if wrong.any() else (np.zeros((0, 2), int), np.zeros(0, int))
    out = []
    for k, i in enumerate(np.argsort(-counts, kind="stable")[:n]):
        t, p = pairs[i]
        mistaken = np.flatnonzero((y == t) & (pred == p))[0]
        other = np.flatnonzero(y == p)
        panels = [thumbnail(paths[mistaken])] + ([thumbnail(paths[other[0]])] if other.size else [])
        strip = Image.new("RGB", (sum(im.width for im in panels) + 8 * (len(panels) - 1),
                                  max(im.height for im in panels)), "white")
        x = 0
        for im in panels:
            strip.paste(im, (x, 0))
            x += im.width + 8
        out.append({"true": tax.classes[t], "answered": tax.classes[p], "count": int(counts[i]),
                    "same_model": bool(tax.fine_to_model[t] == tax.fine_to_model[p]),
                    "png": page.image(f"pairs/pair{k}.png", strip)})
    return out


def _matrix_figure(cm: np.ndarray, names: list[str], title: str):
    """scikit-learn's display: photo counts in the cells (up to 30 classes), a colour bar, names on both axes."""
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * n + 3), max(4, 0.3 * n + 2)))
    ConfusionMatrixDisplay(cm, display_labels=names if n <= 60 else None).plot(
        ax=ax, cmap="Blues", include_values=n <= 30, xticks_rotation="vertical", colorbar=True,
        text_kw={"fontsize": 7})
    ax.tick_params(labelsize=7)
    ax.set(xlabel="answered", ylabel="true", title=title)
    return fig


def _confusion_brand(probs, y, tax):
    brand, _, _ = answer(probs, tax)
    used = np.unique(np.concatenate([tax.fine_to_brand[y], brand]))
    cm = confusion_matrix(tax.fine_to_brand[y], brand, labels=used)
    return _matrix_figure(cm, [tax.brands[b] for b in used], "brand confusion (photos)")


def _confusion_block(probs, y, tax, confused: list[dict], size: int = 30):
    """The fine-level matrix restricted to the classes of the most confused pairs (readable at 396)."""
    names = list(dict.fromkeys(c for p in confused for c in (p["true"], p["answered"])))[:size]
    if not names:
        names = [tax.classes[c] for c in np.unique(y)[:size]]
    idx = [tax.class_index[c] for c in names]
    pred = answer(probs, tax)[2]
    keep = np.isin(y, idx)
    cm = confusion_matrix(y[keep], pred[keep], labels=idx)
    return _matrix_figure(cm, names, f"fine classes of the most confused pairs ({len(names)})")


def _reliability(logits, probs, y, temperature: float):
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, p, title in ((axes[0], softmax(logits), "before temperature"),
                         (axes[1], probs, f"after temperature T={temperature:.2f}")):
        b = calibration_bins(p, y)                    # the bins the ECE in the title is computed over
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.bar([c for c, _, _ in b], [a for _, a, _ in b], width=0.8 / ECE_BINS, alpha=0.7, label="accuracy")
        ax.plot([c for c, _, _ in b], [a for _, a, _ in b], "o-")
        ax.set_title(f"{title}: ECE {ece(p, y):.3f}")
        ax.set_xlabel("confidence (top-1)")
    axes[0].set_ylabel("accuracy")
    return fig


def _coverage(probs, y, tax) -> dict:
    """Per threshold: share answered and precision when answering only above it, per level; and
    back-off (the answer's fine class, else its model, else its brand, when sure enough)."""
    brand, model, fine = answer(probs, tax)
    model_p, brand_p = tax.marginals(probs)
    n = np.arange(len(y))
    conf = {"fine": probs[n, fine], "model": model_p[n, model], "brand": brand_p[n, brand]}
    hit = {"fine": fine == y, "model": model == tax.fine_to_model[y], "brand": brand == tax.fine_to_brand[y]}
    out = {level: [] for level in (*LEVELS, "backoff")}
    for t in THRESHOLDS:
        for level in LEVELS:
            answered = conf[level] >= t
            out[level].append({"threshold": float(t), "coverage": float(answered.mean()),
                               "precision": float(hit[level][answered].mean()) if answered.any() else None})
        level_of = np.select([conf["fine"] >= t, conf["model"] >= t, conf["brand"] >= t], [0, 1, 2], 3)
        right = np.select([level_of == 0, level_of == 1, level_of == 2], [hit["fine"], hit["model"], hit["brand"]], False)
        answered = level_of < 3
        out["backoff"].append({"threshold": float(t), "coverage": float(answered.mean()),
                               "precision": float(right[answered].mean()) if answered.any() else None,
                               **{f"at_{lv}": float((level_of == i).mean()) for i, lv in enumerate(LEVELS)}})
    return out


def _plot_coverage(coverage: dict):
    fig, ax = plt.subplots(figsize=(6, 4))
    for level in (*LEVELS, "backoff"):
        pts = [(r["coverage"], r["precision"]) for r in coverage[level] if r["precision"] is not None]
        ax.plot(*zip(*pts), "o-" if level == "backoff" else "-", ms=3,
                label="year -> model -> brand back-off" if level == "backoff" else level)
    ax.set_xlabel("coverage (share of photos answered)")
    ax.set_ylabel("precision of the answers given")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _cams(net, paths, probs, y, tax, page: Page, n: int) -> list[dict]:
    """Activation maps of the top-1 answer for up to n right and n wrong photos (evenly sampled)."""
    pred = answer(probs, tax)[2]
    out = []
    for kind, where in (("right", np.flatnonzero(pred == y)), ("wrong", np.flatnonzero(pred != y))):
        pick = where[np.linspace(0, len(where) - 1, min(n, len(where))).astype(int)] if len(where) else []
        if not len(pick):
            continue
        heats, _ = grad_cam(net, [paths[i] for i in pick])
        for j, (i, heat) in enumerate(zip(pick, heats)):
            out.append({"kind": kind, "true": tax.classes[y[i]], "answered": tax.classes[pred[i]],
                        "p": float(probs[i, pred[i]]), "png": page.image(f"cams/{kind}{j}.png", overlay(paths[i], heat))})
    return out


def _template():
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v: "—" if v is None else f"{v:.3f}"
    return env.get_template("template.html")
