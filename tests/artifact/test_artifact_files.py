"""The artifact's files survive whatever they hold and wherever they are written (issue 15).

Names that pandas reads as missing (``NA``, ``None``...), names no CSV can hold, non-finite numbers,
file modes under a umask, a full disk, a resume on the wrong data, an ASCII locale, copies of one photo,
and an enrollment that tells the user what it did (added / in all, near-duplicates, demo names).
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from hier import artifact, enrollment, fileio
from hier.enrollment import classes as enrollment_classes
from hier.artifact.files import STATISTICS
from hier.models.statistics import ClassStatistics
from hier.training.config import TrainConfig
from hier.errors import HierError
from hier.models import ModelConfig
from hier.taxonomy import REGISTRY, Taxonomy, check_name

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
ROOK = "Cinder_Rook_2019_2023"


def _snapshot(path):
    """Every file's bytes (temp files included, so a leftover shows), and its mode."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mode) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".hier.lock"}


def _shots(demo_data, cls=ROOK, n=5):
    return sorted((demo_data.train_dir / cls).glob("*.jpg"))[:n]


def _imgs(paths):
    return [a for p in paths for a in ("--images", p)]


def _refused(code, err):
    return code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _ends_refused(code, err):
    """Progress bars may come first; then one error line, and no traceback."""
    lines = err.strip().splitlines()
    return code == 2 and lines[-1].startswith("error:") and sum(l.startswith("error:") for l in lines) == 1 \
        and "Traceback" not in err


# --- 2. names that read back as missing, names that cannot be stored -------------------------------------

@pytest.mark.parametrize("cls, brand, model", [("NA", "None", "null"), ("N/A", "NaN", 'a,"b')])
def test_names_pandas_reads_as_missing_enroll_and_keep_working(cls, brand, model, art, demo_data, capsys):
    """Before: enroll succeeded, then every command (unenroll too) said 'taxonomy has an empty value'."""
    code, out, err = run_cli("enroll", art, "--class", cls, "--brand", brand, "--model", model, "--years", "2025",
                             *_imgs(_shots(demo_data)), capsys=capsys)
    assert code == 0, err
    tax = artifact.load(art)[1]
    assert tax.row(cls)["brand"] == brand and tax.row(cls)["model"] == model
    code, out, err = run_cli("predict", art, _shots(demo_data)[0], "--topk", "13", "--format", "json", capsys=capsys)
    assert code == 0 and cls in {r["class"] for r in json.loads(out)}, err
    code, _, err = run_cli("unenroll", art, "--class", cls, capsys=capsys)
    assert code == 0, err
    assert len(artifact.load(art)[1]) == 12


def test_an_artifact_written_before_the_fix_with_na_names_loads(legacy_art):
    """An already 'bricked' artifact: its taxonomy.csv holds NA cells written by the old writer
    (``to_csv(index=False)``); the reader takes them as the strings they are."""
    art = legacy_art
    tax = artifact.load(art)[1]
    table = tax.table.copy()
    table.loc[0, "class"], table.loc[0, "brand"], table.loc[0, "model"] = "NA", "null", "None"
    table.loc[table["model"] == tax.table.loc[0, "model"], "model"] = "None"
    table.loc[table["brand"] == tax.table.loc[0, "brand"], "brand"] = "null"
    table.to_csv(art / "taxonomy.csv", index=False)
    assert b"\nNA,null,None," in (art / "taxonomy.csv").read_bytes()
    net, back = artifact.load(art)
    assert back.classes[0] == "NA" and back.row("NA")["brand"] == "null" and "None" in back.models


def test_the_registry_loads_exactly_as_before():
    old = pd.read_csv(REGISTRY / "hecto2025.csv", dtype={"class": str, "brand": str, "model": str},
                      encoding="utf-8-sig")              # the reader before the fix
    assert Taxonomy.from_csv(REGISTRY / "hecto2025.csv").table.to_dict("list") == Taxonomy(old).table.to_dict("list")


NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s.strip())


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAMES, NAMES, NAMES), min_size=1, max_size=4, unique_by=lambda r: r[0]))
def test_every_storable_name_survives_the_round_trip(tmp_path_factory, rows):
    """Property: any name ``check_name`` accepts reads back from taxonomy.csv exactly (one brand per model)."""
    brand_of = {}
    rows = [(c, brand_of.setdefault(m, b), m) for c, b, m in rows]
    tax = Taxonomy(pd.DataFrame([[c, b, m, 2020, 2021] for c, b, m in rows],
                                columns=["class", "brand", "model", "year_start", "year_end"]))
    for c, b, m in rows:
        for n in (c, b, m):
            check_name("name", n)
    path = tmp_path_factory.mktemp("rt") / "taxonomy.csv"
    tax.to_csv(path)
    assert Taxonomy.from_csv(path).table.to_dict("list") == tax.table.to_dict("list")


@pytest.mark.parametrize("flag, value, message", [
    ("--class", "", "must not be empty"), ("--class", "   ", "must not be empty"),
    ("--class", "Neu\r_2025", "control character"), ("--class", "Neu\n_2025", "control character"),
    ("--class", "Neu\t_2025", "control character"), ("--class", "Neu\x00_2025", "control character"),
    ("--class", " Neu_2025", "spaces"), ("--brand", "Zephyr ", "spaces"), ("--model", "Ga\rle", "control character"),
    ("--brand", "", "must not be empty"),
])
def test_names_that_cannot_be_stored_are_refused_byte_identical(flag, value, message, art, demo_data, capsys):
    before = _snapshot(art)
    args = {"--class": "Neu_2025", "--brand": "Zephyr", "--model": "Gale", flag: value}
    code, _, err = run_cli("enroll", art, *[a for kv in args.items() for a in kv], *_imgs(_shots(demo_data, n=2)),
                           capsys=capsys)
    assert _refused(code, err) and message in err, err
    assert _snapshot(art) == before


def test_a_name_the_csv_cannot_return_is_refused_by_the_save_itself(art):
    """The round trip is verified on the temp file: a bare CR (not quoted by the csv module) never lands."""
    net, tax = artifact.load(art)
    before = _snapshot(art)
    table = tax.table.copy()
    table.loc[0, "generation"] = "a\rb"
    with pytest.raises(HierError, match="cannot store"):
        artifact.save(art, net, Taxonomy(table))
    assert _snapshot(art) == before


# --- 3. numbers ------------------------------------------------------------------------------------------

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
    before = _snapshot(art)
    code, _, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu", *flags,
                           *_imgs(_shots(demo_data, n=2)), capsys=capsys)
    assert _refused(code, err) and message in err, err
    assert _snapshot(art) == before


def test_library_refuses_non_finite_numbers(art, demo_data):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(HierError, match="--calibrate"):
            enrollment.Calibration(bad)
        with pytest.raises(HierError, match="--max-base-drop"):
            enrollment.enroll(art, "Neu_Wagen_2025_2025", _shots(demo_data, n=2), brand="Neu", max_base_drop=bad)
    for kw, flag in (({"lr": float("inf")}, "--lr"), ({"head_lr": float("nan")}, "--head-lr"),
                     ({"weight_decay": float("nan")}, "--weight-decay"), ({"smoothing": float("nan")}, "--smoothing"),
                     ({"smoothing": 2.0}, "--smoothing"), ({"val_frac": float("nan")}, "--val-frac"),
                     ({"epochs": float("inf")}, "--epochs"), ({"batch_size": 2.5}, "--batch-size"),
                     ({"warmup_epochs": float("nan")}, "--warmup-epochs"), ({"fold": 5}, "--fold")):
        with pytest.raises(HierError, match=flag):
            TrainConfig(**kw)
    for kw, name in (({"img_size": 0}, "--img-size"), ({"drop": float("nan")}, "drop"),
                     ({"temperature": float("inf")}, "temperature"), ({"scale": 0.0}, "scale"),
                     ({"alpha": float("nan")}, "alpha")):
        with pytest.raises(HierError, match=name):
            ModelConfig(**kw)


def test_a_non_finite_offset_is_never_stored(art, demo_data, monkeypatch, capsys):
    """Whatever computes it: a nan offset would make the class's probabilities nan in every answer."""
    before = _snapshot(art)
    monkeypatch.setattr(enrollment_classes, "base_drop_offset", lambda *a, **k: float("nan"))
    code, _, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu",
                           *_imgs(_shots(demo_data, n=2)), capsys=capsys)
    assert _refused(code, err) and "not a finite number" in err, err
    assert _snapshot(art) == before


# --- 9. file modes ---------------------------------------------------------------------------------------

def test_a_trained_artifact_is_readable_as_the_umask_allows(tiny_artifact):
    """Before: model.safetensors, config.json, taxonomy.csv, checkpoint.pt... were 0600 under umask 022."""
    want = 0o666 & ~fileio.UMASK
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_artifact[0].iterdir() if p.name != ".hier.lock"}
    assert {"model.safetensors", "config.json", "taxonomy.csv", "checkpoint.pt", "train.json"} <= set(modes)
    assert modes == {name: want for name in modes}


WRITE = """
import os, sys
from pathlib import Path
from hier import fileio
d = Path(sys.argv[1])
(d / "kept").write_text("old"); os.chmod(d / "kept", 0o640)
fileio.atomic_write_all({d / "new": lambda p: p.write_text("x"), d / "kept": lambda p: p.write_text("y")})
print(oct(os.stat(d / "new").st_mode & 0o777), oct(os.stat(d / "kept").st_mode & 0o777), (d / "kept").read_text())
"""


@pytest.mark.parametrize("umask, mode", [(0o022, "0o644"), (0o002, "0o664")])
def test_new_files_honour_the_umask_and_replaced_files_keep_their_mode(umask, mode, tmp_path):
    out = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], capture_output=True, text=True, umask=umask,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.stdout.split() == [mode, "0o640", "y"], out.stderr[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "new"]           # no temp file left


# --- 10. a full disk, resume on the wrong data -------------------------------------------------------------

def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_enroll_is_one_line_and_the_artifact_is_unchanged(art, demo_data, monkeypatch, capsys):
    before = _snapshot(art)
    monkeypatch.setattr(Taxonomy, "to_csv", _full)               # the second of the set's writes
    code, _, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu",
                           *_imgs(_shots(demo_data, n=2)), capsys=capsys)
    assert _refused(code, err) and "no space left on device writing" in err and "the artifact is unchanged" in err
    assert "taxonomy.csv" in err
    assert _snapshot(art) == before                             # the weights written first: removed


def test_a_full_disk_during_index_add_is_one_line(art, demo_data, tmp_path, monkeypatch, capsys):
    import faiss
    assert run_cli("index", "build", art, demo_data.train_dir / "Aurora_Nova_2015_2018", capsys=capsys)[0] == 0
    before = _snapshot(art)
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(_shots(demo_data)[0], more / "NEW1.jpg")
    monkeypatch.setattr(faiss, "write_index", _full)
    code, _, err = run_cli("index", "add", art, more, capsys=capsys)
    assert _ends_refused(code, err) and "no space left on device" in err and "the artifact is unchanged" in err, err
    assert _snapshot(art) == before


def test_resume_on_data_missing_a_class_is_refused_before_writing(art, demo_data, tmp_path, capsys):
    """Before: train.json was rewritten, then a size-mismatch traceback from the checkpoint."""
    data = tmp_path / "data"
    for d in sorted(demo_data.train_dir.iterdir())[1:]:
        shutil.copytree(d, data / d.name)
    before = _snapshot(art)
    code, _, err = run_cli("train", data, "--out", art, "--resume", "--epochs", "13", capsys=capsys)
    assert _refused(code, err) and "1 of the run's 12 classes have no photos" in err, err
    assert _snapshot(art) == before


# --- 11. an ASCII locale ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_korean_names_under_an_ascii_locale(art, demo_data):
    """``PYTHONUTF8=0 LC_ALL=C``: argv arrives surrogate-escaped and open() defaults to ASCII. Before:
    enrolling 신형모델_2025 crashed in the CSV writer, and config.json holding it could not be read
    (and printing it to the ASCII stdout raised: ``hier.cli.base`` writes it \\u-escaped now)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUTF8": "0", "LC_ALL": "C"}
    for name in ("LANG", "PYTHONIOENCODING"):
        env.pop(name, None)

    def hier(*args):
        return subprocess.run([sys.executable, "-m", "hier", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=600)
    r = hier("enroll", art, "--class", "신형모델_2025", "--brand", "현대", *_imgs(_shots(demo_data)))
    assert r.returncode == 0, r.stderr[-800:]
    assert "\\uc2e0\\ud615\\ubaa8\\ub378_2025" in r.stdout
    assert "신형모델_2025,현대,신형모델,2025,2025," in (art / "taxonomy.csv").read_text(encoding="utf-8")
    assert '"class": "신형모델_2025"' in (art / "config.json").read_text(encoding="utf-8")
    r = hier("predict", art, _shots(demo_data)[0], "--topk", "13", "--format", "json")
    assert r.returncode == 0, r.stderr[-800:]
    assert "신형모델_2025" in {row["class"] for row in json.loads(r.stdout)}    # \u escapes are JSON
    assert hier("unenroll", art, "--class", "신형모델_2025").returncode == 0
    assert len(artifact.load(art)[1]) == 12


# --- 13, 14. what enrollment counts and says -------------------------------------------------------------

def test_copies_of_a_photo_are_one_shot_and_enrolling_again_adds(art, demo_data, tmp_path, capsys):
    shots = tmp_path / "shots"
    shots.mkdir()
    first, second, third = _shots(demo_data, n=3)
    for name in ("a.jpg", "b.jpg", "c.jpg"):                  # three copies of one photo
        shutil.copy(first, shots / name)
    shutil.copy(second, shots / "d.jpg")
    code, out, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--brand", "Neu", "--images", shots,
                             capsys=capsys)
    assert code == 0 and "enrolled 'Neu_Wagen_2025_2025' from 2 shot(s); 2 duplicate photo(s) dropped" in out, err
    assert artifact.read_config(art)["enrolled"][0]["shots"] == 2
    shutil.copy(third, shots / "e.jpg")                        # again: only the new photo is added
    code, out, err = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--images", shots, capsys=capsys)
    assert code == 0 and "added 1 shot(s) to 'Neu_Wagen_2025_2025' (3 in all); 4 duplicate photo(s) dropped" in out
    before = _snapshot(art)
    code, out, _ = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--images", shots, capsys=capsys)
    assert code == 0 and "added nothing" in out and _snapshot(art) == before
    stats = ClassStatistics.load(art / STATISTICS)
    assert artifact.read_config(art)["enrolled"][0]["shots"] == 3 == stats.shot_counts[stats.index["Neu_Wagen_2025_2025"]]


def test_a_near_duplicate_of_a_known_class_is_reported(art, demo_data, capsys):
    """Shots of a base class under a new name, with the strictest budget: it keeps none of its own shots
    (answered as the served answer is, with the temperature). Before: no word of it. Centred similarity
    0.98 to Cinder_Rook_2019_2023's prototype."""
    r = enrollment.enroll(art, "Twin_2025_2025", _shots(demo_data), brand="Zephyr", max_base_drop=0)
    assert (r.new, r.added, r.total) == (True, 5, 5)
    assert r.own_shots_answered < enrollment.OWN_SHOTS and r.offset_cost >= 0
    assert r.near_duplicate["class"] == ROOK and r.near_duplicate["similarity"] >= enrollment.NEAR_DUPLICATE
    enrollment.unenroll(art, "Twin_2025_2025")
    code, out, err = run_cli("enroll", art, "--class", "Twin_2025_2025", "--brand", "Zephyr", "--max-base-drop", "0",
                             *_imgs(_shots(demo_data)), capsys=capsys)
    assert code == 0 and len(err.strip().splitlines()) == 1, err
    assert f"looks like a near-duplicate of class '{ROOK}' (similarity 0.9" in err
    assert f"its offset costs it {r.offset_cost:.0%} of its own shots" in err


def test_a_class_unlike_any_known_one_is_not_a_near_duplicate(art, tmp_path, capsys):
    """Stripes, nothing like a drawn car: no class named (centred similarity 0.79 measured). The trained
    head answered them as a base class (a warning said so); the statistical head answers them as the
    new class, so no warning at all."""
    shots = tmp_path / "stripes"
    shots.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        stripes = np.zeros((64, 64, 3), np.uint8)
        stripes[:, ::4] = rng.integers(200, 256, 3)
        Image.fromarray(stripes).save(shots / f"s{i}.png")
    code, out, err = run_cli("enroll", art, "--class", "Stripes_2025_2025", "--brand", "Zephyr", "--images", shots,
                             capsys=capsys)
    assert code == 0 and "warning" not in err, err
    stats = ClassStatistics.load(art / STATISTICS)
    base = stats.base_classes()
    assert enrollment.nearest_base(stats.means(base), stats.shot_sums[stats.index["Stripes_2025_2025"]],
                                   base)[1] < enrollment.NEAR_DUPLICATE


def test_demo_names_enroll_without_brand_or_model(art, demo_data, capsys):
    """Before: ``Aurora_Nova_2024_2025`` was read as model 'Aurora' of an unknown brand: refused."""
    code, _, err = run_cli("enroll", art, "--class", "Aurora_Nova_2024_2025", *_imgs(_shots(demo_data, n=2)),
                           capsys=capsys)
    assert code == 0, err
    code, _, err = run_cli("enroll", art, "--class", "Aurora_Zeta_2025_2025", *_imgs(_shots(demo_data, n=2)),
                           capsys=capsys)
    assert code == 0, err
    tax = artifact.load(art)[1]
    assert (tax.row("Aurora_Nova_2024_2025")["brand"], tax.row("Aurora_Nova_2024_2025")["model"]) == ("Aurora", "Nova")
    assert (tax.row("Aurora_Zeta_2025_2025")["brand"], tax.row("Aurora_Zeta_2025_2025")["model"]) == ("Aurora", "Zeta")
    assert len(tax.models) == 7 and len(tax.brands) == 3       # one new model, no new brand


@pytest.mark.parametrize("damage", ["truncated heads", "heads without names", "truncated trunk"])
def test_damaged_weights_files_are_one_line(damage, art, demo_data, capsys):
    """A heads.safetensors cut short or stripped of its row names, or a truncated model.safetensors: one
    error line saying the artifact is damaged, never a SafetensorError traceback."""
    from safetensors.torch import load_file, save_file
    heads, trunk = art / artifact.HEADS, art / artifact.WEIGHTS
    if damage == "truncated heads":
        heads.write_bytes(heads.read_bytes()[:100])
    elif damage == "heads without names":
        save_file(load_file(heads), heads)
    else:
        trunk.write_bytes(trunk.read_bytes()[: trunk.stat().st_size // 2])
    code, _, err = run_cli("predict", art, _shots(demo_data, n=1)[0], capsys=capsys)
    assert _ends_refused(code, err) and "is damaged" in err, err
