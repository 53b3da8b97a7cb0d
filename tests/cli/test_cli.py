"""The command line's own checks: bad numbers and inputs of train, evaluate, predict, similar, index and demo
refused in one ``error:`` line (exit 2) before any work (issue 7, item 4; issue 15, item 3), errors and usage
errors without a traceback, Ctrl-C a failure exit (130, issue 7, item 5), and printing that never crashes
under an ASCII locale."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import (
    ASCII,
    hier_ascii,
    one_error_line,
    one_error_line_after_warnings,
    photos_of,
    rename_classes,
    run_cli,
    small_dataset,
    tree,
)

# --- numbers and inputs refused before any work (issue 7, item 4; issue 15, item 3) ---------------------

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


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be a whole number from 1 to"),
    (["--batch-size", "0"], "--batch-size must be a whole number from 1 to"),
    (["--accum", "0"], "--accum must be a whole number from 1 to"),
    (["--val-frac", "1"], "--val-frac must be below 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--val-frac", "nan"], "--val-frac must be a finite number from 0 to 1"),
    (["--img-size", "0"], "--img-size must be a whole number from 16 to"),
    (["--val-frac", "0.05"], "each side needs one per class"),
    (["--fold", "0", "--folds", "12"], "--folds 12 needs at least 12 per class"),
])
def test_bad_training_flags_are_one_line(flags, message, demo_data, tmp_path, capsys):
    data = small_dataset(demo_data, tmp_path / "data")
    code, _, err = run_cli("train", data, "--out", tmp_path / "run", "--model", "test_efficientnet",
                           "--pretrained", "none", *flags, capsys=capsys)
    assert one_error_line_after_warnings(code, err) and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-1", "100000000"])
def test_evaluate_refuses_a_bad_batch_size(value, tiny_artifact, demo_data, capsys):
    """Before: a traceback from torch's DataLoader after the artifact was loaded."""
    code, _, err = run_cli("evaluate", tiny_artifact[0], demo_data.train_dir, "--batch-size", value, capsys=capsys)
    assert one_error_line(code, err) and "--batch-size" in err, err


@pytest.mark.parametrize("args, flag", [
    (["predict", "{art}", "{photo}", "--batch-size", "0"], "--batch-size"),
    (["predict", "{art}", "{photo}", "--batch-size", "-3"], "--batch-size"),
    (["predict", "{art}", "{photo}", "--batch-size", "100000000"], "--batch-size"),
    (["predict", "{art}", "{photo}", "--topk", "-1"], "--topk"),
    (["similar", "{art}", "{photo}", "--k", "-1"], "--k"),
    (["similar", "{art}", "{photo}", "--k", "0"], "--k"),
])
def test_numeric_flags_out_of_range_are_one_line(args, flag, tiny_artifact, demo_data, capsys):
    photo = sorted(demo_data.train_dir.glob("*/*.jpg"))[0]
    code, _, err = run_cli(*[a.format(art=tiny_artifact[0], photo=photo) for a in args], capsys=capsys)
    assert one_error_line(code, err) and flag in err, err


def test_bad_prediction_inputs_are_one_line(tiny_artifact, demo_data, tmp_path, capsys):
    photo = photos_of(demo_data, "Aurora_Nova_2015_2018")[0]
    code, _, err = run_cli("predict", tiny_artifact[0], photo, "--topk", "0", capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "--topk" in err
    code, _, err = run_cli("similar", tiny_artifact[0], photo, "--k", "0", capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "--k" in err
    csv = tmp_path / "test.csv"
    csv.write_text(f"ID,img_path\nA,{photo}\nB,\n")
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", csv, "--sample-submission", csv,
                           "--out", tmp_path / "sub.csv", capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "row 3 has an empty 'img_path' cell" in err
    listings = tmp_path / "listings.csv"
    listings.write_text(f"listing_id,image\nL1,{photo}\nL2,\n")
    code, _, err = run_cli("index", "build", tiny_artifact[0], listings, capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "empty 'image' cell" in err
    code, _, err = run_cli("predict", tiny_artifact[0], photo, "--topk", "x", capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "--topk" in err


# --- `hier demo`: bad numbers, a folder of the user's ---------------------------------------------------

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


# --- bad input: one line on stderr, exit 2, nothing written ---------------------------------------------

@pytest.mark.parametrize("case", ["missing_data", "not_empty", "unknown_class", "not_artifact", "bad_image"])
def test_cli_errors_are_one_line(case, tiny_artifact, demo_data, tmp_path, capsys):
    args = {
        "missing_data": ["train", tmp_path / "nope", "--out", tmp_path / "o"],
        "not_empty": ["train", demo_data.train_dir, "--out", tiny_artifact[0]],
        "unknown_class": ["train", demo_data.train_dir, "--taxonomy", _one_class_taxonomy(demo_data, tmp_path),
                          "--out", tmp_path / "o"],
        "not_artifact": ["evaluate", tmp_path, demo_data.train_dir],
        "bad_image": ["predict", tiny_artifact[0], demo_data.taxonomy],
    }[case]
    code, out, err = run_cli(*args, capsys=capsys)
    assert code == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def _one_class_taxonomy(demo_data, tmp_path):
    t = pd.read_csv(demo_data.taxonomy).iloc[:1]
    t.to_csv(tmp_path / "tax.csv", index=False)
    return tmp_path / "tax.csv"


def test_usage_errors_have_no_traceback(capsys):
    code, _, err = run_cli("enroll", capsys=capsys)
    assert code == 2 and "Missing" in err and "Traceback" not in err


# --- interrupts (issue 7, item 5) -----------------------------------------------------------------------

def test_ctrl_c_is_a_failure_exit(demo_data, tmp_path, monkeypatch, capsys):
    import hier.training

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(hier.training, "train", interrupted)
    code, _, err = run_cli("train", demo_data.train_dir, "--out", tmp_path / "run", capsys=capsys)
    assert code == 130 and "interrupted" in err


# --- an ASCII locale: LC_ALL=C without Python's UTF-8 mode ----------------------------------------------

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
