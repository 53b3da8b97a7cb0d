"""Tests for the synthetic demo dataset (hier.data.synthetic)."""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hier import fileio
from hier.data import synthetic as demo
from hier.data.demo import DEMO_MARKER, DEMO_PARTS, DemoData, make_demo_dataset
from hier.data.synthetic import draw_car

BOM = b"\xef\xbb\xbf"


def _rows(path: Path, encoding: str = "utf-8") -> list[dict[str, str]]:
    with path.open(newline="", encoding=encoding) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """One small dataset shared by the read-only layout tests."""
    root = tmp_path_factory.mktemp("demo_small") / "data"
    return make_demo_dataset(root, images_per_class=3, test_images_per_class=2, img_size=48, seed=0)


def test_layout_and_counts(small: DemoData) -> None:
    assert small.root.is_dir()
    assert small.train_dir == small.root / "train"
    assert small.test_csv == small.root / "test.csv"
    assert small.test_labels == small.root / "test_labels.csv"
    assert small.sample_submission == small.root / "sample_submission.csv"
    assert small.taxonomy == small.root / "taxonomy.csv"

    assert len(small.classes) == 12
    assert small.classes == sorted(small.classes)
    folders = sorted(p.name for p in small.train_dir.iterdir())
    assert folders == small.classes
    for cls in small.classes:
        files = sorted(p.name for p in (small.train_dir / cls).iterdir())
        assert files == [f"{cls}_{i:04d}.jpg" for i in range(3)]
        with Image.open(small.train_dir / cls / files[0]) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (48, 48)


def test_test_csv_and_labels(small: DemoData) -> None:
    with small.test_csv.open(encoding="utf-8") as f:
        assert f.readline().strip() == "ID,img_path"
    rows = _rows(small.test_csv)
    assert len(rows) == 12 * 2
    assert [r["ID"] for r in rows] == [f"TEST_{i:05d}" for i in range(24)]
    for r in rows:
        assert r["img_path"] == f"./test/{r['ID']}.jpg"
        p = small.test_csv.parent / r["img_path"]
        assert p.is_file()
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))
    assert len(list((small.root / "test").iterdir())) == 24

    labels = _rows(small.test_labels)
    assert list(labels[0].keys()) == ["ID", "class"]
    assert [r["ID"] for r in labels] == [r["ID"] for r in rows]
    counts = Counter(r["class"] for r in labels)
    assert counts == {c: 2 for c in small.classes}
    # Shuffled: a class-grouped order would change label only 11 times.
    seq = [r["class"] for r in labels]
    changes = sum(a != b for a, b in zip(seq, seq[1:]))
    assert changes > 15


def test_sample_submission_has_bom_and_uniform_probs(small: DemoData) -> None:
    raw = small.sample_submission.read_bytes()
    assert raw.startswith(BOM)
    assert not raw[3:].startswith(BOM)
    rows = _rows(small.sample_submission, encoding="utf-8-sig")
    assert list(rows[0].keys()) == ["ID", *sorted(small.classes)]
    assert [r["ID"] for r in rows] == [r["ID"] for r in _rows(small.test_csv)]
    for r in rows:
        probs = [float(r[c]) for c in small.classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert all(p == pytest.approx(1 / 12) for p in probs)


def test_taxonomy_is_a_clean_hierarchy(small: DemoData) -> None:
    rows = _rows(small.taxonomy)
    assert list(rows[0].keys()) == ["class", "brand", "model", "year_start", "year_end"]
    assert sorted(r["class"] for r in rows) == small.classes
    assert len({r["class"] for r in rows}) == 12
    assert len({r["brand"] for r in rows}) == 3
    assert len({r["model"] for r in rows}) == 6

    model_brand: dict[str, set[str]] = {}
    for r in rows:
        model_brand.setdefault(r["model"], set()).add(r["brand"])
        assert re.fullmatch(r"[A-Za-z0-9_]+", r["class"]), r["class"]
        assert int(r["year_start"]) <= int(r["year_end"])
    assert all(len(b) == 1 for b in model_brand.values())  # each model under one brand
    assert Counter(next(iter(b)) for b in model_brand.values()) == {
        b: 2 for b in {r["brand"] for r in rows}
    }
    # Two non-overlapping year ranges per model.
    for m in model_brand:
        spans = sorted((int(r["year_start"]), int(r["year_end"])) for r in rows if r["model"] == m)
        assert len(spans) == 2
        assert spans[0][1] < spans[1][0]


def test_silhouettes_follow_the_spec() -> None:
    """Models of one brand differ in shape; some shapes are shared across brands."""
    by_brand: dict[str, list[str]] = {}
    for _m, (brand, shape, _years) in demo._MODELS.items():
        by_brand.setdefault(brand, []).append(shape)
    assert all(len(set(s)) == len(s) == 2 for s in by_brand.values())
    shape_brands = Counter(s for shapes in by_brand.values() for s in set(shapes))
    assert max(shape_brands.values()) >= 2


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(images_per_class=2, test_images_per_class=1, img_size=40)
    a = make_demo_dataset(tmp_path / "a", seed=7, **kw)
    b = make_demo_dataset(tmp_path / "b", seed=7, **kw)
    c = make_demo_dataset(tmp_path / "c", seed=8, **kw)

    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) == 12 * 2 + 12 + 4
    for rel in files_a:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel

    jpgs = [p for p in files_a if p.suffix == ".jpg"]
    differing = sum((a.root / p).read_bytes() != (c.root / p).read_bytes() for p in jpgs)
    assert differing == len(jpgs)
    assert a.taxonomy.read_bytes() == c.taxonomy.read_bytes()


def test_refuses_non_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    precious = root / "thesis.txt"
    precious.write_text("do not touch")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo_dataset(root, images_per_class=1, test_images_per_class=1, img_size=32)
    assert [p.name for p in root.iterdir()] == ["thesis.txt"]
    assert precious.read_text() == "do not touch"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        make_demo_dataset(a_file, images_per_class=1, test_images_per_class=1, img_size=32)

    empty = tmp_path / "empty"
    empty.mkdir()
    d = make_demo_dataset(empty, images_per_class=1, test_images_per_class=1, img_size=32)
    assert len(list(d.train_dir.iterdir())) == 12


def test_draw_car_cues_are_controlled() -> None:
    """With the same RNG, only the intended cue changes: year is subtle, model is not."""
    year_diff, model_diff = [], []
    for s in range(10):
        def img(model: str, year: int) -> np.ndarray:
            im = draw_car(np.random.default_rng(s), "Aurora", model, year, 96)
            assert im.mode == "RGB" and im.size == (96, 96)
            return np.asarray(im, dtype=np.int16)

        old, new, other = img("Nova", 2015), img("Nova", 2020), img("Vela", 2015)
        assert np.array_equal(old, img("Nova", 2015))
        year_diff.append((np.abs(old - new).max(axis=2) > 30).mean())
        model_diff.append((np.abs(old - other).max(axis=2) > 30).mean())
    # Measured (128 px, 200 cars): year cue changes 0.5-2.8 % of pixels; models differ by 8-25 %.
    assert 0.002 < min(year_diff) and max(year_diff) < 0.06
    assert min(model_diff) > 0.05
    assert np.mean(model_diff) > 3 * np.mean(year_diff)


def test_draw_car_rejects_unknown_names() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        draw_car(rng, "Tesla", "Nova", 2015, 64)
    with pytest.raises(ValueError):
        draw_car(rng, "Borealis", "Nova", 2015, 64)  # Nova belongs to Aurora


def test_default_call_is_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    d = make_demo_dataset(tmp_path / "default")
    elapsed = time.perf_counter() - t0
    # Measured ~1.5-2 s on one slow core; the product budget is 10 s.
    assert elapsed < 10.0
    assert sum(1 for _ in d.train_dir.rglob("*.jpg")) == 12 * 40
    assert len(_rows(d.test_csv)) == 12 * 8
    with Image.open(d.train_dir / d.classes[0] / f"{d.classes[0]}_0000.jpg") as im:
        assert im.size == (128, 128)


def test_brand_is_linearly_separable_from_tiny_pixels(tmp_path: Path) -> None:
    """The brand cue must be visible in pixels, not only in the labels."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = make_demo_dataset(tmp_path / "sep", images_per_class=20, test_images_per_class=10,
                          img_size=64, seed=3)
    brand_of = {r["class"]: r["brand"] for r in _rows(d.taxonomy)}

    def feats(paths: list[Path]) -> np.ndarray:
        out = []
        for p in paths:
            with Image.open(p) as im:
                small = im.convert("RGB").resize((16, 16), Image.BOX)
            out.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
        return np.stack(out)

    train = [(p, brand_of[c]) for c in d.classes for p in sorted((d.train_dir / c).glob("*.jpg"))]
    test = [(d.root / "test" / f"{r['ID']}.jpg", brand_of[r["class"]]) for r in _rows(d.test_labels)]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    clf.fit(feats([p for p, _ in train]), [b for _, b in train])
    acc = clf.score(feats([p for p, _ in test]), [b for _, b in test])
    # Chance is 1/3; measured 0.94-1.00 over seeds 0-7 with this exact setup.
    assert acc > 0.8, acc


# --- `hier demo`: a failed or interrupted run can be run again into the same --out ---------------------

@pytest.mark.slow
def test_demo_reruns_into_the_folder_of_an_interrupted_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """Before: a run stopped after drawing left --out full, and every rerun said "is not empty"."""
    import json

    from conftest import one_error_line, run_cli, tree

    from hier.recognizer import Recognizer

    out = tmp_path / "demo"
    args = ("demo", "--out", out, "--epochs", "1", "--img-size", "32", "--images-per-class", "5")
    real_train = Recognizer.__dict__["train"].__func__

    def interrupted(cls, *a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(Recognizer, "train", classmethod(interrupted))
    code, _, _ = run_cli(*args, capsys=capsys)
    assert code == 130 and len(list((out / "data" / "train").iterdir())) == 12     # drawn, then stopped

    (out / "mine.txt").write_text("mine")          # a file of the user's beside the unfinished run: refused
    before = tree(out)
    code, _, err = run_cli(*args, capsys=capsys)
    assert one_error_line(code, err) and "mine.txt" in err, err
    assert tree(out) == before
    (out / "mine.txt").unlink()

    def tiny(cls, *a, **kw):                       # the 0.1 M-parameter test trunk: seconds, not minutes
        return real_train(cls, *a, **{**kw, "trunk": "test_efficientnet", "pretrained": "none"})
    monkeypatch.setattr(Recognizer, "train", classmethod(tiny))
    code, stdout, err = run_cli(*args, capsys=capsys)
    assert code == 0 and "unfinished demo run; starting over" in err, err
    assert len(_rows(out / "submission.csv")) == 12 * 8 and "4/4" in stdout
    assert json.loads((out / DEMO_MARKER).read_text(encoding="utf-8"))["finished"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted([DEMO_MARKER, fileio.LOCK, *DEMO_PARTS])

    before = tree(out)                             # a finished demo is the user's now: refused, untouched
    code, _, err = run_cli(*args, capsys=capsys)
    assert one_error_line(code, err) and "finished demo" in err, err
    assert tree(out) == before


def test_a_second_demo_run_into_the_folder_of_a_running_one_is_refused(tmp_path: Path, capsys) -> None:
    """Before: two ``hier demo`` runs into one --out each took the other's unfinished folder for an
    interrupted run and deleted its data (then one ended in a traceback). A running demo holds the
    folder's lock; the second is one line and leaves the folder as it was."""
    import json
    import subprocess
    import sys

    from conftest import one_error_line, run_cli, tree

    out = tmp_path / "demo"
    out.mkdir()
    (out / DEMO_MARKER).write_text(json.dumps({"finished": False}), encoding="utf-8")   # a run under way
    (out / "data").mkdir()
    (out / "data" / "drawn.jpg").write_bytes(b"the first run's photo")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hier import fileio\n"
                               f"with fileio.locked({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(out)
        code, _, err = run_cli("demo", "--out", out, "--epochs", "1", capsys=capsys)
        assert one_error_line(code, err) and "another hier demo run" in err, err
        assert tree(out) == before
    finally:
        holder.kill()
        holder.wait()
