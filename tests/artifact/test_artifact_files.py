"""The artifact's own files, whatever they hold and wherever they are read: names that pandas reads as missing
(``NA``, ``None``...) enroll, load and are served, also from an artifact written before the fix; a name the
CSV cannot give back is refused by the save itself (issue 15, item 2); Korean names under an ASCII locale
(item 11); damaged weights files are one line. And versions: an artifact from before the class statistics
answers as before, with one warning."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, ends_in_one_error, files_and_modes, image_flags, photos_of, run_cli

from hier import artifact
from hier.errors import HierError
from hier.runtime import Predictor
from hier.taxonomy import Taxonomy

# --- names that read back as missing, names that cannot be stored (issue 15, item 2) --------------------

@pytest.mark.parametrize("cls, brand, model", [("NA", "None", "null"), ("N/A", "NaN", 'a,"b')])
def test_names_pandas_reads_as_missing_enroll_and_keep_working(cls, brand, model, art, demo_data, capsys):
    """Before: enroll succeeded, then every command (unenroll too) said 'taxonomy has an empty value'."""
    code, out, err = run_cli("enroll", art, "--class", cls, "--brand", brand, "--model", model, "--years", "2025",
                             *image_flags(photos_of(demo_data, n=5)), capsys=capsys)
    assert code == 0, err
    tax = artifact.load(art)[1]
    assert tax.row(cls)["brand"] == brand and tax.row(cls)["model"] == model
    code, out, err = run_cli("predict", art, photos_of(demo_data, n=5)[0], "--topk", "13", "--format", "json",
                             capsys=capsys)
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


def test_a_name_the_csv_cannot_return_is_refused_by_the_save_itself(art):
    """The round trip is verified on the temp file: a bare CR (not quoted by the csv module) never lands."""
    net, tax = artifact.load(art)
    before = files_and_modes(art)
    table = tax.table.copy()
    table.loc[0, "generation"] = "a\rb"
    with pytest.raises(HierError, match="cannot store"):
        artifact.save(art, net, Taxonomy(table))
    assert files_and_modes(art) == before


# --- an ASCII locale (issue 15, item 11) ----------------------------------------------------------------

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
    r = hier("enroll", art, "--class", "신형모델_2025", "--brand", "현대", *image_flags(photos_of(demo_data, n=5)))
    assert r.returncode == 0, r.stderr[-800:]
    assert "\\uc2e0\\ud615\\ubaa8\\ub378_2025" in r.stdout
    assert "신형모델_2025,현대,신형모델,2025,2025," in (art / "taxonomy.csv").read_text(encoding="utf-8")
    assert '"class": "신형모델_2025"' in (art / "config.json").read_text(encoding="utf-8")
    r = hier("predict", art, photos_of(demo_data, n=5)[0], "--topk", "13", "--format", "json")
    assert r.returncode == 0, r.stderr[-800:]
    assert "신형모델_2025" in {row["class"] for row in json.loads(r.stdout)}    # \u escapes are JSON
    assert hier("unenroll", art, "--class", "신형모델_2025").returncode == 0
    assert len(artifact.load(art)[1]) == 12


# --- damaged files --------------------------------------------------------------------------------------

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
    code, _, err = run_cli("predict", art, photos_of(demo_data, n=1)[0], capsys=capsys)
    assert ends_in_one_error(code, err) and "is damaged" in err, err


# --- an artifact an older hier wrote --------------------------------------------------------------------

@pytest.mark.slow
def test_an_artifact_from_before_the_statistics_answers_as_before_and_says_so_once(legacy_art, demo_data):
    import subprocess
    import sys

    from hier.errors import HierWarning
    with pytest.warns(HierWarning, match="older hier, without class statistics"):
        net, _ = artifact.load(legacy_art)
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[:8]
    out = Predictor(net)(photos)
    assert net.class_weight is None and "trained" not in out and not net.cfg.tta  # the trained head serves
    with torch.no_grad():
        trained = net.trained_heads(torch.from_numpy(out["embedding"]))["joint"].numpy()
    np.testing.assert_allclose(out["joint"], trained, atol=1e-4)
    run = subprocess.run([sys.executable, "-m", "hier", "predict", str(legacy_art), *map(str, photos[:2])],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr.count("warning:") == 1 and "older hier" in run.stderr, run.stderr
