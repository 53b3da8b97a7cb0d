"""What ``Recognizer.predict`` returns: one ``Prediction`` per photo and the ``Results`` list around them,
with one schema behind ``to_frame``, ``to_csv`` and ``to_json`` (as ultralytics' ``engine/results.py``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from hier import fileio
from hier.errors import HierError, check_number
from hier.metrics import path_of
from hier.taxonomy import Taxonomy

TOPK_COLUMNS = ["rank", "class", "brand", "model", "years", "p", "p_model", "p_brand"]


@dataclass
class Prediction:
    """One photo's answer, read top-down (``hier.metrics.answer``: the likeliest brand, its likeliest
    model, that model's likeliest class) with the probabilities of each (P(fine) <= P(model) <= P(brand)),
    the top-k fine classes (ranked by P(class), so the first can differ from ``fine``), and ``probs``,
    the whole calibrated distribution over ``Results.classes`` (a view into ``Results.probs``)."""

    image: str
    brand: str
    model: str
    fine: str
    years: str
    p: float
    p_model: float
    p_brand: float
    topk: list[dict] = field(default_factory=list)
    probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The answer as JSON-ready values (without the full distribution)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "probs"}

    def __repr__(self) -> str:
        return (f"Prediction({Path(self.image).name}: {self.brand} > {self.model} > {self.fine}, "
                f"p {self.p:.3f} (model {self.p_model:.3f}, brand {self.p_brand:.3f}))")

    def plot(self, image=None, width: int = 480):
        """The photo with its answer and top-k drawn below it, as a PIL image (Hangul included), for a
        notebook. ``image``: the photo, when it was given in memory rather than as a path."""
        from PIL import Image, ImageDraw, ImageFont

        from hier.data import to_rgb
        from hier.drawing import hangul_font
        width = int(check_number("width", width, 16, 8192, integer=True))
        if image is None and not Path(self.image).is_file():
            raise HierError(f"{self.image} was given in memory (or is gone): pass it, plot(image=...)")
        photo = Image.fromarray(to_rgb(image if image is not None else self.image, 2 * width))
        photo.thumbnail((width, width))
        lines = [(f"{self.brand} > {self.model} > {self.fine}  {self.p:.0%}", 18)] + \
            [(f"{t['rank']}. {t['class']}  {t['p']:.1%}", 14) for t in self.topk]
        height = photo.height + 12 + sum(size + 6 for _, size in lines)
        canvas = Image.new("RGB", (max(width, photo.width), height), "white")
        canvas.paste(photo, (0, 0))
        draw, y = ImageDraw.Draw(canvas), photo.height + 8
        for text, size in lines:
            draw.text((8, y), text, font=ImageFont.truetype(str(hangul_font()), size), fill="#1d2329")
            y += size + 6
        return canvas

    def save(self, path: str | Path, image=None, width: int = 480) -> Path:
        """``plot()`` written in the format ``path``'s suffix names (PNG, JPEG, WebP ...), atomically."""
        from PIL import Image
        picture = self.plot(image, width)
        kind = Image.registered_extensions().get(Path(path).suffix.lower())
        if kind is None:
            raise HierError(f"{path}: say the picture's format by its suffix (.png, .jpg, .webp ...)")
        try:
            fileio.atomic_write(path, lambda p: picture.save(p, format=kind))
        except (OSError, ValueError) as e:     # a format PIL cannot write RGB in, a folder that is a file ...
            raise HierError(f"cannot save {path} ({getattr(e, 'strerror', None) or e})") from None
        return Path(path)


class Results(list):
    """``Prediction`` per photo, in the order given (an in-memory image given twice is answered twice; a
    path given twice once, as ``image_files`` reads each file once), with the (N, C) matrix ``probs`` over
    ``classes``, ``speed`` (``load_ms``: reading and compiling the model, the first call and after the
    artifact changed; ``ms_per_photo``: the rest of the call per photo) and one schema behind ``to_frame``,
    ``to_csv`` and ``to_json``.

    Example:
        >>> results = Recognizer("runs/x").predict(["a.jpg", "b.jpg"], topk=3)
        >>> results[0].brand, results[0].p_brand
        >>> results.to_csv("answers.csv")
    """

    def __init__(self, predictions=(), probs: np.ndarray | None = None, classes: list[str] | None = None,
                 speed: dict | None = None):
        super().__init__(predictions)
        self.probs, self.classes, self.speed = probs, classes or [], speed or {}

    def __repr__(self) -> str:
        speed = self.speed
        timing = (f"; model read in {speed['load_ms']:,.0f} ms, {speed['ms_per_photo']:,.1f} ms a photo"
                  if "load_ms" in speed else "")
        rows = "".join(f"\n  {r!r}" for r in self[:10]) + (f"\n  ... {len(self) - 10} more" if len(self) > 10 else "")
        return f"Results({len(self)} photo(s), {len(self.classes)} classes{timing}){rows}"

    def to_frame(self) -> pd.DataFrame:
        """One row per (photo, rank), as ``hier predict --format csv`` prints, each with the photo's
        answer (``answer``, ``answer_brand``, ``answer_model``: read top-down, so it can differ from
        rank 1, the likeliest single class)."""
        return pd.DataFrame([{"image": r.image, **row, "answer": r.fine, "answer_brand": r.brand,
                              "answer_model": r.model} for r in self for row in r.topk],
                            columns=["image", *TOPK_COLUMNS, "answer", "answer_brand", "answer_model"])

    def to_csv(self, path: str | Path) -> None:
        """``to_frame`` as a UTF-8 CSV, written atomically."""
        frame = self.to_frame()
        fileio.atomic_write(path, lambda p: frame.to_csv(p, index=False, encoding="utf-8"))

    def to_json(self) -> str:
        """Every ``Prediction.to_dict`` as a JSON list (UTF-8 text, Korean names as they are)."""
        return json.dumps([r.to_dict() for r in self], ensure_ascii=False, indent=1)


def ranked(probs: np.ndarray, tax: Taxonomy, k: int) -> list[list[dict]]:
    """Each photo's k likeliest fine classes, with their model's and brand's probability: one sort of
    the whole matrix, rows built in one pass (linear in the photos)."""
    model_p, brand_p = tax.marginals(probs)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    n = np.arange(len(probs))[:, None]
    p, pm, pb = probs[n, top], model_p[n, tax.fine_to_model[top]], brand_p[n, tax.fine_to_brand[top]]
    per_class = [{"class": c, "brand": tax.brands[tax.fine_to_brand[i]], "model": tax.models[tax.fine_to_model[i]],
                  "years": tax.years(c)} for i, c in enumerate(tax.classes)]
    return [[{"rank": r + 1, **per_class[c], "p": float(p[i, r]), "p_model": float(pm[i, r]), "p_brand": float(pb[i, r])}
             for r, c in enumerate(top[i])] for i in range(len(probs))]


def photo_name(image, i: int) -> str:
    """How a photo is named in ``Results``: its path, or ``<image i>`` for one given in memory."""
    return str(image) if isinstance(image, (str, Path)) else f"<image {i}>"


def results_of(out: dict[str, np.ndarray], names: list[str], tax: Taxonomy, topk: int) -> Results:
    """``Results`` of a predictor's outputs (``probs`` and its ``answer``, the served answer) for photos
    named ``names``."""
    probs = out["probs"]
    model_p, brand_p = tax.marginals(probs)
    brand, model, fine = path_of(out["answer"], tax)
    rows = ranked(probs, tax, topk)
    results = Results(probs=probs, classes=list(tax.classes))
    for i, name in enumerate(names):
        c = tax.classes[fine[i]]
        results.append(Prediction(
            image=name, brand=tax.brands[brand[i]], model=tax.models[model[i]], fine=c, years=tax.years(c),
            p=float(probs[i, fine[i]]), p_model=float(model_p[i, model[i]]), p_brand=float(brand_p[i, brand[i]]),
            topk=rows[i], probs=probs[i]))
    return results
