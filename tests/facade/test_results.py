"""What `evaluate` and `predict` report on the tiny artifact: evaluate's JSON, its top-1 and brand accuracy
those of the answers `predict` returns (top-down, not the flat argmax), and the top-k JSON inside the
hierarchy (a class within its model, a model within its brand)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from hier.errors import HierError
from hier.recognizer import Recognizer
from hier.taxonomy import Taxonomy


def test_evaluate_json(tiny_artifact, demo_data, capsys):
    code, out, _ = run_cli("evaluate", tiny_artifact[0], demo_data.train_dir, "--json", capsys=capsys)
    m = json.loads(out)
    assert code == 0 and m["images"] == 144
    assert 0 <= m["ece"] <= 1 and m["top5"] >= m["top1"] > 1 / 12


def test_the_reported_accuracy_is_that_of_the_answers_returned(tiny_artifact, demo_data):
    """evaluate's top-1 and brand accuracy are the share of `predict`'s answers that are right (before,
    evaluate scored the flat argmax while predict answered top-down)."""
    from hier.data import image_files
    rec = Recognizer(tiny_artifact[0])
    m = rec.evaluate(demo_data.train_dir)
    photos = image_files([demo_data.train_dir]).paths
    preds = rec.predict(photos, topk=1)
    truth = {c: rec.taxonomy.row(c) for c in rec.taxonomy.classes}
    fine = np.mean([p.fine == Path(p.image).parent.name for p in preds])
    brand = np.mean([p.brand == truth[Path(p.image).parent.name]["brand"] for p in preds])
    assert (m["top1"], m["brand_acc"]) == (pytest.approx(fine), pytest.approx(brand))


def test_topk_json_is_hierarchical(tiny_artifact, demo_data, capsys):
    images = sorted((demo_data.root / "test").glob("*.jpg"))[:2]
    code, out, _ = run_cli("predict", tiny_artifact[0], *images, "--topk", "3", "--format", "json", capsys=capsys)
    rows = json.loads(out)
    assert code == 0 and len(rows) == 6
    tax = Taxonomy.from_csv(demo_data.taxonomy)
    for r in rows:
        assert tax.row(r["class"])["brand"] == r["brand"] and tax.row(r["class"])["model"] == r["model"]
        assert r["p"] <= r["p_model"] + 1e-9 <= r["p_brand"] + 2e-9      # a class is inside its model and brand


def test_results_read_well_draw_themselves_and_time_the_model_read_apart(art, demo_data, tmp_path):
    """For a notebook: a readable repr, ``plot()``/``save()`` drawing the photo with its answer and top-k
    (as ultralytics' ``Results.plot``), and ``speed`` keeping the model read out of the per-photo time."""
    from PIL import Image
    from conftest import photos_of
    rec = Recognizer(art)
    assert repr(rec) == f"Recognizer({str(art)!r}, artifact, device='cpu', backend='auto')"     # nothing read
    photos = photos_of(demo_data, "Cinder_Rook_2019_2023", 2)
    first = rec.predict(photos, topk=3)
    assert repr(rec) == f"Recognizer({str(art)!r}, artifact, 12 classes, device='cpu', backend='auto')"
    again = rec.predict(photos, topk=3)
    r = first[0]
    assert repr(r) == (f"Prediction({photos[0].name}: {r.brand} > {r.model} > {r.fine}, p {r.p:.3f} "
                       f"(model {r.p_model:.3f}, brand {r.p_brand:.3f}))")
    assert repr(first).startswith("Results(2 photo(s), 12 classes; model read in ") and repr(r) in repr(first)
    assert first.speed["load_ms"] > 10 * again.speed["load_ms"]          # read once, then held
    assert first.speed["ms_per_photo"] > 0 and again.speed["photos"] == 2
    picture = r.plot(width=240)
    thumb = Image.open(photos[0]).convert("RGB")
    thumb.thumbnail((240, 240))
    assert picture.size == (240, thumb.height + 12 + (18 + 6) + 3 * (14 + 6))      # the photo, the answer, top-3
    saved = r.save(tmp_path / "answer.png", width=240)
    assert Image.open(saved).size == picture.size and Image.open(saved).format == "PNG"
    assert Image.open(r.save(tmp_path / "answer.webp")).format == "WEBP"            # the suffix's format
    with pytest.raises(HierError, match="suffix"):
        r.save(tmp_path / "answer.unknown")
    with pytest.raises(HierError, match="cannot save"):
        r.save(tmp_path / "answer.xbm")                 # a format PIL cannot write a colour picture in
    with pytest.raises(HierError, match="width"):
        r.plot(width=0)
    in_memory = rec.predict(Image.open(photos[0]))[0]
    with pytest.raises(HierError, match="plot\\(image="):
        in_memory.plot()                       # its name is no file: before, '<image 0>' was opened as one
    assert in_memory.plot(Image.open(photos[0])).width == 480
