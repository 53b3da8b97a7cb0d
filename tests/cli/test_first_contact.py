"""What a person meets first on the command line: -h and --version, mistakes named before any heavy
import, one spelling of --format, and --images as a shell or a quoted glob."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import error_line_only, photos_of, run_cli

from hier.version import __version__


def _hier(*args) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hier", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
    return done, time.perf_counter() - t


def test_version_and_short_help(monkeypatch):
    """-h and --version; the command list gives each command's first docstring paragraph on one line
    (rich kept the docstring's breaks: audit's ended "... brightness, exact" and went on below), and a
    hidden argument stays out of the usage line (enroll showed ``[more]...``)."""
    done, _ = _hier("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"hier {__version__}"
    monkeypatch.setenv("COLUMNS", "250")
    for args in (["-h"], ["predict", "-h"], ["enroll", "-h"]):
        done, _ = _hier(*args)
        assert done.returncode == 0 and "Usage: hier" in done.stdout, args
    listing = _hier("-h")[0].stdout
    audit = next(line for line in listing.splitlines() if line.strip("│ ").startswith("audit "))
    assert "exact duplicates" in audit and audit.rstrip("│ ").endswith("unreadable files."), audit
    assert "Usage: hier enroll [OPTIONS] {artifact}" in _hier("enroll", "-h")[0].stdout.replace("  ", " ")
    assert "more" not in next(line for line in _hier("enroll", "-h")[0].stdout.splitlines() if "Usage:" in line)


@pytest.mark.parametrize("args", [
    ["predict", "ART", "--bogus"], ["train", "/no/such/folder", "--epochs", "x"], ["enroll", "ART"],
    ["evaluate", "ART", "DATA", "--format", "xml"],
    # values, not only spellings (these came after 5-7 s of imports): a missing artifact, a folder that is
    # none, a photo, a CSV or a data folder that is not there, a port out of range
    ["predict", "/no/such/artifact", "a.jpg"], ["predict", "{tests}", "a.jpg"], ["predict", "{art}", "/no/a.jpg"],
    ["predict", "{art}", "--test-csv", "/no/test.csv", "--sample-submission", "/no/s.csv", "--out", "o.csv"],
    ["enroll", "{art}", "--class", "New_2025", "--images", "/no/shots/*.jpg"], ["evaluate", "{art}", "/no/data"],
    ["serve", "{art}", "--port", "99999"], ["serve", "{art}", "--host", ""], ["index", "build", "{art}", "/no/listings.csv"],
    ["predict", "{art}", ""],                       # an empty path: it was the current folder, searched whole
    ["train", "/no/such/folder"]])
def test_a_mistyped_command_is_one_line_in_under_two_seconds(args, tiny_artifact):
    """No torch, timm or FastAPI import before the flags and the paths are checked (measured: 0.6-0.9 s a
    process on an idle machine; the faster of two runs, so that a moment's load elsewhere does not
    decide)."""
    args = [a.format(art=tiny_artifact[0], tests=Path(__file__).parent) for a in args]
    (done, first), (_, second) = _hier(*args), _hier(*args)
    assert done.returncode == 2 and error_line_only(done.returncode, done.stderr), done.stderr
    assert min(first, second) < 2.0, (first, second)


def test_evaluate_speaks_format_like_every_other_command(tiny_artifact, demo_data, capsys):
    art = tiny_artifact[0]
    code, out, _ = run_cli("evaluate", art, demo_data.train_dir, "--format", "json", capsys=capsys)
    metrics = json.loads(out)
    assert code == 0 and 0 <= metrics["top1"] <= 1
    code, out, _ = run_cli("evaluate", art, demo_data.train_dir, "--format", "csv", capsys=capsys)
    header, row = out.strip().splitlines()
    assert code == 0 and "top1" in header.split(",") and float(row.split(",")[header.split(",").index("top1")]) \
        == pytest.approx(metrics["top1"])


def test_images_take_what_a_shell_glob_expands_to_and_a_quoted_glob(art, demo_data, tmp_path, capsys):
    shots = tmp_path / "shots"
    shots.mkdir()
    for p in photos_of(demo_data, "Cinder_Rook_2019_2023", 4):
        (shots / p.name).write_bytes(p.read_bytes())
    files = sorted(shots.iterdir())
    code, out, err = run_cli("enroll", art, "--class", "Cinder_Rook_2025_2025", "--images", *files, capsys=capsys)
    assert code == 0 and "from 4 shot(s)" in out, err                        # --images a b c d
    assert run_cli("unenroll", art, "--class", "Cinder_Rook_2025_2025", capsys=capsys)[0] == 0
    code, out, err = run_cli("enroll", art, "--class", "Cinder_Rook_2025_2025", "--images", f"{shots}/*.jpg",
                             capsys=capsys)
    assert code == 0 and "from 4 shot(s)" in out, err                        # --images 'shots/*.jpg'
    code, _, err = run_cli("enroll", art, "--class", "Cinder_Rook_2026_2026", "--images", f"{shots}/*.png",
                           capsys=capsys)
    assert error_line_only(code, err) and "no file matches" in err
    deep = shots / "a" / "b"                          # '**' goes any depth, as a shell's globstar (it went one)
    deep.mkdir(parents=True)
    files[0].rename(deep / files[0].name)
    code, out, err = run_cli("predict", art, f"{shots}/**/*.jpg", "--format", "csv", capsys=capsys)
    assert code == 0 and out.count(".jpg") >= 4 and files[0].name in out, err


def test_photos_where_the_artifact_goes_are_named_as_such(art, demo_data, tmp_path, capsys):
    """``hier enroll --class X --images a.jpg b.jpg ART``: the shell's order puts a photo in the artifact's
    place; one line says the artifact comes first, before any heavy import."""
    files = photos_of(demo_data, "Cinder_Rook_2019_2023", 2)
    code, _, err = run_cli("enroll", "--class", "Cinder_Rook_2025_2025", "--images", *files, art, capsys=capsys)
    assert error_line_only(code, err) and "the artifact comes first" in err


def test_the_artifact_s_own_files_are_no_shots(art, capsys):
    """``--images ART`` (or a folder inside it): its curves.png was enrolled as a car photo."""
    before = sorted(p.name for p in art.iterdir())
    code, _, err = run_cli("enroll", art, "--class", "Cinder_Rook_2025_2025", "--images", art, capsys=capsys)
    assert error_line_only(code, err) and "is a file of the artifact" in err
    assert sorted(p.name for p in art.iterdir()) == before


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("where", ["under a file", "a link to nothing"])
def test_an_out_that_cannot_be_a_folder_is_one_line(command, where, demo_data, tmp_path, capsys):
    """``--out`` under a file or at a dangling link (and a read-only volume, which root cannot stage here)
    was a traceback (NotADirectoryError, FileExistsError) from the first mkdir."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "afile" / "sub" if where == "under a file" else tmp_path / "dangling"
    args = ["train", demo_data.train_dir, "--model", "test_efficientnet", "--pretrained", "none", "--epochs", "1"] \
        if command == "train" else ["demo", "--epochs", "1"]
    code, _, err = run_cli(*args, "--out", out, capsys=capsys)
    assert error_line_only(code, err) and f"--out {out}" in err, err
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "nowhere").exists()
