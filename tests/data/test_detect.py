"""Car crops with the offline YOLOv8n detector in ../shared/models (skipped where it or LiteRT is absent)."""
import shutil

import numpy as np
import pytest
from conftest import SHARED, STANFORD, run_cli
from PIL import Image

from hier.data import Crop, to_rgb

DETECTOR = SHARED / "models" / "yolov8n_int8.tflite"
pytestmark = pytest.mark.skipif(not DETECTOR.is_file() or not STANFORD.is_dir(), reason="needs ../shared")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    import hier.data.detect
    monkeypatch.setattr(hier.data.detect, "CACHE", tmp_path / "cache")


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("ai_edge_litert")
    from hier.data.detect import CarDetector
    return CarDetector(DETECTOR)


def _photos(n=6):
    return sorted(STANFORD.glob("*/*.jpg"))[::97][:n]


def test_largest_vehicle_box_with_margin_and_a_content_cache(detector, tmp_path):
    from hier.data.detect import CarDetector
    photos = _photos()
    det = CarDetector(DETECTOR, cache=tmp_path / "c")
    boxes = det.boxes(photos)
    found = [b for b in boxes if b]
    assert len(found) >= 4                                   # real car photos: most have a vehicle box
    for p, b in zip(photos, boxes):
        if b:
            w, h = Image.open(p).size
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
    shutil.copy(photos[0], tmp_path / "renamed.jpg")
    again = CarDetector(DETECTOR, cache=tmp_path / "c")       # a new process: boxes come from the cache
    again.model = None                                       # any detection would fail now
    assert again.boxes([tmp_path / "renamed.jpg"]) == boxes[:1]
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 120), (128, 128, 128)).save(blank)
    items, rate = det.crops([photos[0], blank])
    assert isinstance(items[0], Crop) and items[1] == blank and rate == 0.5
    assert to_rgb(items[0]).shape[0] <= to_rgb(photos[0]).shape[0]


def test_crop_command_mirrors_the_tree_and_reports_fallbacks(detector, tmp_path, capsys):
    data = tmp_path / "data"
    for p in _photos(3):
        (data / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, data / p.parent.name / p.name)
    (data / "empty_road").mkdir()
    Image.fromarray(np.full((90, 160, 3), 90, np.uint8)).save(data / "empty_road" / "road.jpg")
    code, out, err = run_cli("crop", data, "--out", tmp_path / "crops", "--detector", DETECTOR, capsys=capsys)
    assert code == 0, err
    assert "of 4 photo(s)" in out and "had no vehicle box" in out
    written = sorted(p.relative_to(tmp_path / "crops") for p in (tmp_path / "crops").rglob("*.jpg"))
    assert written == sorted(p.relative_to(data) for p in data.rglob("*.jpg"))
    assert Image.open(tmp_path / "crops" / "empty_road" / "road.jpg").size == (160, 90)    # kept whole
    code, _, err = run_cli("crop", data, "--out", tmp_path / "crops", "--detector", DETECTOR, capsys=capsys)
    assert code == 2 and "not empty" in err


def test_a_missing_detector_is_one_line_before_any_work(tiny_artifact, demo_data, tmp_path, capsys):
    code, _, err = run_cli("train", demo_data.train_dir, "--out", tmp_path / "run", "--crop", "yolo",
                           "--detector", tmp_path / "nope.pt", capsys=capsys)
    assert code == 2 and err.startswith("error: detector weights not found") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli("predict", tiny_artifact[0], _photos(1)[0], "--crop", "yolo", capsys=capsys)
    assert code == 2 and "--detector" in err


def test_predict_on_crops(detector, tiny_artifact, capsys):
    code, out, err = run_cli("predict", tiny_artifact[0], *_photos(3), "--crop", "yolo", "--detector", DETECTOR,
                             "--format", "json", "--topk", "1", capsys=capsys)
    assert code == 0 and "car crops:" in err, err


def test_loading_the_detector_keeps_pillows_own_open(detector, tmp_path):
    """ultralytics replaces PIL.Image.open on import with one that fetches pi-heif for any unknown file;
    hier puts Pillow's back, so a README in a photo folder is still skipped, not a crash."""
    from PIL import Image as PILImage

    from hier.data import NOT_IMAGE, check_image
    (tmp_path / "README.txt").write_text("listing notes")
    assert check_image(tmp_path / "README.txt") == NOT_IMAGE
    assert not PILImage.open.__module__.startswith("ultralytics")
