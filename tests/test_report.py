"""`hier report` and `hier predict --explain`: figures that agree with `evaluate`, a page that loads
in headless Chromium with every image present, activation maps that depend on the class, and bad
input refused in one line with nothing half-written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import chromium, run_cli
from hier import Recognizer
from hier.report import grad_cam


def test_report_agrees_with_evaluate_and_loads_in_chromium(tiny_artifact, demo_data, tmp_path, capsys):
    art, out = tiny_artifact[0], tmp_path / "report"
    code, stdout, err = run_cli("report", art, demo_data.train_dir, "--out", out, capsys=capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    want = Recognizer(art).evaluate(demo_data.train_dir)
    for key in ("images", "top1", "log_loss", "model_acc", "brand_acc", "ece", "ece_before_temperature"):
        assert m[key] == pytest.approx(want[key], abs=1e-9), key
    assert m["brand_acc"] >= m["model_acc"] >= m["top1"] and m["model_log_loss"] <= m["log_loss"]
    # worst first; pairs counted from real mistakes; coverage falls as the threshold rises
    assert [c["accuracy"] for c in m["worst_classes"]] == sorted(c["accuracy"] for c in m["worst_classes"])
    assert sum(p["count"] for p in m["confused_pairs"]) <= round((1 - m["top1"]) * m["images"])
    assert m["confused_pairs"] and any(p["same_model"] for p in m["confused_pairs"])
    fine = [r["coverage"] for r in m["coverage"]["fine"]]
    assert fine[0] == 1.0 and fine == sorted(fine, reverse=True)
    backoff, strict = m["coverage"]["backoff"], m["coverage"]["fine"]
    assert all(b["coverage"] >= f["coverage"] for b, f in zip(backoff, strict))     # backing off answers more
    cams = sorted(p.name for p in (out / "cams").glob("*.png"))
    assert len(cams) == 12 and "wrong0.png" in cams
    with chromium() as browser:
        browser.get((out / "index.html").as_uri())
        images = browser.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        browser.save_screenshot(str(tmp_path / "report.png"))
    assert len(images) == 4 + len(m["confused_pairs"]) + len(cams)
    assert all(ok for _, ok in images), [src for src, ok in images if not ok]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_bad_input_is_one_line_and_writes_nothing(tiny_artifact, demo_data, tmp_path, capsys):
    art = tiny_artifact[0]
    strangers = tmp_path / "strangers"
    shutil.copytree(demo_data.train_dir / "Cinder_Rook_2019_2023", strangers / "Martian_Rover_2030_2031")
    (tmp_path / "empty").mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.txt").write_text("mine")
    for data, out, message in ((strangers, tmp_path / "r1", "no class of"),
                               (tmp_path / "empty", tmp_path / "r2", "has no class folders"),
                               (demo_data.train_dir, busy, "is not an earlier hier report")):
        code, _, err = run_cli("report", art, data, "--out", out, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    assert [p.name for p in busy.iterdir()] == ["thesis.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporary folder left


def test_predict_explain_saves_one_map_per_photo(tiny_artifact, demo_data, tmp_path, capsys):
    photos = sorted((demo_data.train_dir / "Aurora_Nova_2015_2018").glob("*.jpg"))[:3]
    code, _, err = run_cli("predict", tiny_artifact[0], *photos, "--explain", tmp_path / "cams", capsys=capsys)
    assert code == 0 and "saved 3 activation map(s)" in err
    assert sorted(p.stem for p in (tmp_path / "cams").iterdir()) == sorted(p.stem for p in photos)
    net = Recognizer(tiny_artifact[0]).net
    top, classes = grad_cam(net, photos)
    other, _ = grad_cam(net, photos, [(c + 6) % 12 for c in classes])
    assert top.min() >= 0 and np.allclose(top.max((1, 2)), 1)
    assert np.abs(top - other).mean() > 0.01                       # the map depends on the class asked about
