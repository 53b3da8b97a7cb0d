"""What `hier enroll` and `unenroll` refuse: one line, exit 2, and the artifact left byte-identical. A base
class, too few shots, no brand, a photo that is no image, an artifact without usable class statistics; names
no CSV can store (issue 15, item 2), bad or non-finite numbers (item 3) and a full disk (item 10)."""
from __future__ import annotations

import pytest
from conftest import enroll_shots, error_line_only, files_and_modes, full_disk, image_flags, photos_of, run_cli
from test_enroll import NEW

from hier import artifact, fileio
from hier.artifact.files import STATISTICS
from hier.enrollment import classes as enrollment_classes
from hier.taxonomy import Taxonomy


def _snapshot(path):
    """Every file of the artifact, gallery included (the empty lock file is no data)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".hier.lock"}


@pytest.mark.parametrize("case", ["base_class", "min_shots", "no_brand", "bad_image", "unenroll_base"])
def test_failed_enroll_leaves_artifact_byte_identical(case, art, demo_data, capsys):
    before = _snapshot(art)
    if case == "base_class":
        code, _, err = enroll_shots(art, demo_data, capsys, name="Aurora_Nova_2015_2018")
    elif case == "min_shots":
        code, _, err = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", "--min-shots", "10")
    elif case == "no_brand":
        code, _, err = enroll_shots(art, demo_data, capsys)
    elif case == "bad_image":
        bad = art.parent / "bad"
        bad.mkdir()
        (bad / "x.jpg").write_bytes(b"not a jpeg")
        code, _, err = run_cli("enroll", art, "--class", NEW, "--brand", "Z", "--images", bad, capsys=capsys)
    else:
        code, _, err = run_cli("unenroll", art, "--class", "Aurora_Nova_2015_2018", capsys=capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert _snapshot(art) == before


@pytest.mark.parametrize("damage", ["missing", "stale"])
def test_enrolling_without_usable_statistics_is_refused_byte_identical(damage, art, demo_data, capsys):
    """A run that has not finished (new weights, statistics of the old ones, or none yet): enrolling
    would mix the trained head's geometry into the statistical one, so it is refused, nothing written."""
    if damage == "missing":
        (art / STATISTICS).unlink()
    else:
        config = artifact.read_config(art)
        config["fingerprint"] = "0" * 32                     # as if the weights were saved by a later epoch
        fileio.write_json(art / artifact.CONFIG, config)
    before = _snapshot(art)
    code, _, err = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr")
    lines = [x for x in err.strip().splitlines() if not x.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and "hier train --resume" in lines[0], err
    assert _snapshot(art) == before


# --- names that cannot be stored (issue 15, item 2) -----------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--class", "", "must not be empty"), ("--class", "   ", "must not be empty"),
    ("--class", "Neu\r_2025", "control character"), ("--class", "Neu\n_2025", "control character"),
    ("--class", "Neu\t_2025", "control character"), ("--class", "Neu\x00_2025", "control character"),
    ("--class", " Neu_2025", "spaces"), ("--brand", "Zephyr ", "spaces"), ("--model", "Ga\rle", "control character"),
    ("--brand", "", "must not be empty"),
])
def test_names_that_cannot_be_stored_are_refused_byte_identical(flag, value, message, art, demo_data, capsys):
    before = files_and_modes(art)
    args = {"--class": "Neu_2025", "--brand": "Zephyr", "--model": "Gale", flag: value}
    code, _, err = run_cli("enroll", art, *[a for kv in args.items() for a in kv],
                           *image_flags(photos_of(demo_data, n=2)), capsys=capsys)
    assert error_line_only(code, err) and message in err, err
    assert files_and_modes(art) == before


# --- numbers (issue 15, item 3) -------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--calibrate", "nan"], "--calibrate must be a finite number"),
    (["--calibrate", "inf"], "--calibrate must be a finite number"),
    (["--calibrate", "-1"], "--calibrate must be a finite number from 0 to 100"),
    (["--max-base-drop", "nan"], "--max-base-drop must be a finite number from 0 to 100"),
    (["--min-shots", "0"], "--min-shots must be a whole number"),
    (["--years", "99999-99999"], "--years must be a whole number from 1886 to 2100"),
    (["--years", "1800"], "--years must be a whole number from 1886 to 2100"),
    (["--years", "2026-2025"], "the first year comes after the last"),
    (["--years", "soon"], "--years must look like"),
])
def test_bad_enroll_numbers_are_refused_byte_identical(flags, message, art, demo_data, capsys):
    before = files_and_modes(art)
    code, _, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu", *flags,
                           *image_flags(photos_of(demo_data, n=2)), capsys=capsys)
    assert error_line_only(code, err) and message in err, err
    assert files_and_modes(art) == before


def test_a_non_finite_offset_is_never_stored(art, demo_data, monkeypatch, capsys):
    """Whatever computes it: a nan offset would make the class's probabilities nan in every answer."""
    before = files_and_modes(art)
    monkeypatch.setattr(enrollment_classes, "base_drop_offset", lambda *a, **k: float("nan"))
    code, _, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu",
                           *image_flags(photos_of(demo_data, n=2)), capsys=capsys)
    assert error_line_only(code, err) and "not a finite number" in err, err
    assert files_and_modes(art) == before


# --- a full disk (issue 15, item 10) --------------------------------------------------------------------

def test_a_full_disk_during_enroll_is_one_line_and_the_artifact_is_unchanged(art, demo_data, monkeypatch, capsys):
    before = files_and_modes(art)
    monkeypatch.setattr(Taxonomy, "to_csv", full_disk)           # the second of the set's writes
    code, _, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu",
                           *image_flags(photos_of(demo_data, n=2)), capsys=capsys)
    assert error_line_only(code, err) and "no space left on device writing" in err \
        and "the artifact is unchanged" in err
    assert "taxonomy.csv" in err
    assert files_and_modes(art) == before                             # the weights written first: removed
