"""The command line's own checks: every numeric flag of train, evaluate and demo refused in one
``error:`` line (exit 2) before any work, and printing that never crashes under an ASCII locale."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import rename_classes, run_cli


def tree(folder) -> dict:
    """Every path under ``folder`` with the SHA-256 of its bytes (folders: "dir"), to show nothing changed."""
    return {p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def one_error_line(code, err) -> bool:
    """Exit 2 and one ``error:`` line, no traceback (a leading blank line left by a progress bar is fine)."""
    return code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1 \
        and "Traceback" not in err


BAD_TRAIN = ["--lr nan", "--lr inf", "--lr 0", "--head-lr nan", "--head-lr -1", "--epochs 0", "--epochs -3",
             "--batch-size 0", "--img-size 0", "--img-size -5", "--val-frac nan", "--val-frac inf", "--val-frac 1",
             "--val-frac -0.1", "--freeze-stages -1", "--cache-views -1", "--accum 0", "--workers -1", "--folds 1",
             "--fold -1"]


@pytest.mark.parametrize("flag", BAD_TRAIN)
def test_train_refuses_bad_numbers_before_any_work(flag, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli("train", demo_data.train_dir, "--out", out, "--model", "test_efficientnet",
                           "--pretrained", "none", *flag.split(), capsys=capsys)
    assert one_error_line(code, err) and flag.split()[0] in err, err
    assert not out.exists()                        # not even train.json


@pytest.mark.parametrize("value", ["0", "-1", "100000000"])
def test_evaluate_refuses_a_bad_batch_size(value, tiny_artifact, demo_data, capsys):
    """Before: a traceback from torch's DataLoader after the artifact was loaded."""
    code, _, err = run_cli("evaluate", tiny_artifact[0], demo_data.train_dir, "--batch-size", value, capsys=capsys)
    assert one_error_line(code, err) and "--batch-size" in err, err


@pytest.mark.parametrize("flag", ["--epochs 0", "--epochs -1", "--epochs nan", "--img-size 0", "--img-size 8",
                                  "--img-size 5000", "--images-per-class 0", "--images-per-class 1",
                                  "--images-per-class 4"])
def test_demo_refuses_bad_numbers_before_drawing(flag, tmp_path, capsys):
    """Before: ``--epochs 0`` drew the data, then refused, and the corrected rerun found the folder full."""
    out = tmp_path / "demo"
    code, _, err = run_cli("demo", "--out", out, *flag.split(), capsys=capsys)
    assert one_error_line(code, err) and flag.split()[0] in err, err
    assert not out.exists()


def test_demo_refuses_a_folder_of_the_users(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    before = tree(tmp_path)
    for out, message in ((tmp_path / "mine", "is not empty"), (tmp_path / "a_file", "is a file")):
        code, _, err = run_cli("demo", "--out", out, "--epochs", "1", capsys=capsys)
        assert one_error_line(code, err) and message in err, err
    assert tree(tmp_path) == before


# --- an ASCII locale: LC_ALL=C without Python's UTF-8 mode ---------------------------------------------
ASCII = {**{k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}, "PYTHONUTF8": "0", "LC_ALL": "C",
         "LANG": "C"}


def hier_ascii(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hier", *map(str, args)], capture_output=True, env=ASCII)


@pytest.fixture
def korean(art):
    """The tiny artifact with Korean class names (the table is UTF-8 whatever the locale)."""
    classes = pd.read_csv(art / "taxonomy.csv", dtype=str, keep_default_na=False)["class"]
    rename_classes(art, {c: f"신형모델_{i}" for i, c in enumerate(classes)})
    encoding = subprocess.run([sys.executable, "-c", "import sys; print(sys.stdout.encoding)"], env=ASCII,
                              capture_output=True, text=True).stdout.strip()
    if encoding.lower() not in ("ascii", "ansi_x3.4-1968"):
        pytest.skip(f"LC_ALL=C gives stdout encoding {encoding} here, not ASCII")
    return art


@pytest.mark.slow
def test_korean_class_names_print_under_an_ascii_locale(korean, demo_data):
    """Before: UnicodeEncodeError (a traceback, exit 1) for every format. Now the table \\u-escapes the
    names, JSON is ASCII-escaped (still the same JSON), CSV is written as UTF-8 bytes."""
    photo = sorted((demo_data.train_dir / "Aurora_Vela_2014_2018").glob("*.jpg"))[0]
    runs = {fmt: hier_ascii("predict", korean, photo, "--topk", "3", "--format", fmt) for fmt in ("table", "json", "csv")}
    for fmt, run in runs.items():
        assert run.returncode == 0 and b"Traceback" not in run.stderr, (fmt, run.stderr.decode(errors="replace"))
    rows = json.loads(runs["json"].stdout.decode("ascii"))
    assert len(rows) == 3 and all(r["class"].startswith("신형모델_") for r in rows)
    table = pd.read_csv(io.BytesIO(runs["csv"].stdout), encoding="utf-8")
    assert table["class"].tolist() == [r["class"] for r in rows]
    assert rows[0]["class"].encode("ascii", "backslashreplace") in runs["table"].stdout


@pytest.mark.slow
def test_export_writes_config_json_as_utf8_under_an_ascii_locale(art):
    """Before: ``export`` wrote config.json in the locale's encoding: UnicodeEncodeError on a Korean name."""
    config = json.loads((art / "config.json").read_text(encoding="utf-8"))
    config["note"] = "신형모델_2025"
    (art / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    run = hier_ascii("export", art)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    saved = json.loads((art / "config.json").read_bytes().decode("utf-8"))
    assert saved["note"] == "신형모델_2025" and saved["onnx"]["file"] == "model.onnx"
    assert (art / "model.onnx").stat().st_size > 10_000
