"""`hier report` and `hier predict --explain`: figures that agree with `evaluate`, a page that loads
in headless Chromium with every image present, activation maps that depend on the class, and bad
input refused in one line with nothing half-written; --out replaced only when it is hier's own earlier
report, with the umask's modes; class names with mathtext and HTML in them shown as text."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import chromium, one_error_line, rename_classes, run_cli, tree

from hier import Recognizer
from hier.report import build, grad_cam


@pytest.fixture(scope="module")
def few(demo_data, tmp_path_factory):
    """Two demo photos per class (24): a report in seconds."""
    root = tmp_path_factory.mktemp("few") / "data"
    for folder in sorted(demo_data.train_dir.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:2]:
            shutil.copy(photo, root / folder.name)
    return root


@pytest.mark.slow
def test_report_agrees_with_evaluate_and_loads_in_chromium(tiny_artifact, demo_data, tmp_path, capsys):
    art, out = tiny_artifact[0], tmp_path / "report"
    code, stdout, err = run_cli("report", art, demo_data.train_dir, "--out", out, capsys=capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    want = Recognizer(art).evaluate(demo_data.train_dir)
    for key in ("images", "top1", "log_loss", "model_acc", "brand_acc", "ece", "ece_before_temperature"):
        assert m[key] == pytest.approx(want[key], abs=1e-9), key
    assert m["brand_acc"] >= m["model_acc"] >= m["top1"] and m["model_log_loss"] <= m["log_loss"]
    # the artifact was trained from this very folder: the page and the command say the figures flatter it
    assert m["in_training_folder"] == m["images"] and "flatter it" in err
    assert f"{m['images']} of these {m['images']}\nphotos are in the folder" in (out / "index.html").read_text()
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
    # 4 figures, the artifact's training curves (drawn by `hier train`), the pairs and the activation maps
    assert len(images) == 5 + len(m["confused_pairs"]) + len(cams) and ["curves.png", True] in images
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


@pytest.mark.parametrize("case", ["site", "file", "cwd", "cwd_parent", "home", "holds_artifact", "data",
                                  "holds_data"])
def test_report_never_replaces_a_folder_it_did_not_write(case, art, few, tmp_path, monkeypatch, capsys):
    """Before: any folder holding an index.html was deleted whole (exit 0), and --out . emptied the
    working directory. Now each is refused in one line, with every byte under tmp_path as it was."""
    site = tmp_path / "site"
    (site / "blog").mkdir(parents=True)
    (site / "index.html").write_text("<h1>my site</h1>")
    (site / "blog" / "post.html").write_text("<p>post</p>")
    (site / "notes.txt").write_text("notes")
    data = tmp_path / "photos" / "data"
    shutil.copytree(few, data)
    (tmp_path / "photos" / "index.html").write_text("album")
    (tmp_path / "a_file").write_text("mine")
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "index.html").write_text("home page")
    monkeypatch.setenv("HOME", str(home))
    project = tmp_path / "project"                 # a folder of the user's holding the artifact
    project.mkdir()
    (project / "index.html").write_text("project page")
    art = shutil.move(art, project / "artifact")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir({"cwd": site, "cwd_parent": site / "blog"}.get(case, tmp_path / "elsewhere"))
    out, message = {"site": (site, "not an earlier hier report"), "file": (tmp_path / "a_file", "is a file"),
                    "cwd": (".", "current folder"), "cwd_parent": ("..", "current folder"),
                    "home": (home, "home folder"), "holds_artifact": (project, "holds the artifact"),
                    "data": (data, "holds the data"), "holds_data": (tmp_path / "photos", "holds the data")}[case]
    before = tree(tmp_path)
    code, _, err = run_cli("report", art, data, "--out", out, capsys=capsys)
    assert one_error_line(code, err) and message in err, err
    assert tree(tmp_path) == before


def failed_after_work(code, err) -> bool:
    """A refusal once the photos were embedded: the progress bar, then one ``error:`` line."""
    lines = err.strip().splitlines()
    return code == 2 and lines[-1].startswith("error:") and not any(ln.startswith("error:") for ln in lines[:-1]) \
        and "Traceback" not in err


def _report(art, data, out, capsys):
    code, _, err = run_cli("report", art, data, "--out", out, capsys=capsys)
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_report_replaces_only_its_own_earlier_report(art, few, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    out.mkdir()                                    # an empty folder is taken
    first = _report(art, few, out, capsys)
    marker = json.loads((out / build.MARKER).read_text(encoding="utf-8"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != build.MARKER)
    assert marker["files"] == files and "index.html" in files and marker["hier"]
    assert first["images"] == 24

    # a file of the user's inside the earlier report: refused, nothing touched
    (out / "cams" / "my notes.txt").write_text("keep me")
    before = tree(tmp_path)
    code, _, err = run_cli("report", art, few, "--out", out, capsys=capsys)
    assert one_error_line(code, err) and "cams/my notes.txt" in err, err
    assert tree(tmp_path) == before
    (out / "cams" / "my notes.txt").unlink()

    # the earlier report is replaced by the new one (other data, so other figures), nothing left aside
    three = tmp_path / "three"
    shutil.copytree(few, three)
    for folder in three.iterdir():
        shutil.copy(next(folder.glob("*.jpg")), folder / "copy.jpg")
    second = _report(art, three, out, capsys)
    assert second["images"] == 36 and json.loads((out / "metrics.json").read_text())["images"] == 36
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "report", "three"]

    # a file the user adds while the report is being built: found at the swap, the old report stays
    write = build._write

    def add_file_meanwhile(*args):
        (out / "late.txt").write_text("added during the build")
        return write(*args)
    monkeypatch.setattr(build, "_write", add_file_meanwhile)
    (out / "late.txt").unlink(missing_ok=True)
    old = {k: v for k, v in tree(tmp_path).items()}
    code, _, err = run_cli("report", art, few, "--out", out, capsys=capsys)
    assert failed_after_work(code, err) and "late.txt" in err, err
    assert {k: v for k, v in tree(tmp_path).items() if k != "report/late.txt"} == old
    monkeypatch.setattr(build, "_write", write)
    (out / "late.txt").unlink()

    # disk full while writing: one line, the earlier report as it was, no temporary folder left
    def full(self, name, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / name))
    monkeypatch.setattr(build.Page, "figure", full)
    before = tree(tmp_path)
    code, _, err = run_cli("report", art, few, "--out", out, capsys=capsys)
    assert failed_after_work(code, err) and "No space left on device" in err and "as it was" in err, err
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_report_folder_modes_follow_the_umask(art, few, tmp_path):
    """Before: the report folder was 0700 (mkdtemp) whatever the umask. A real process with umask 027."""
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "hier", "report", str(art), str(few), "--out", str(out)],
                         capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027))
    assert run.returncode == 0, run.stderr
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["report"] == 0o750 and modes["report/cams"] == 0o750
    assert {m for k, m in modes.items() if (tmp_path / k).is_file()} == {0o640}


def test_report_shows_mathtext_and_html_in_class_names_as_text(art, few, tmp_path, capsys):
    """Before: a class named ``M$\\frac$ 2024`` crashed matplotlib's mathtext parser (traceback)."""
    names = {"Aurora_Nova_2015_2018": "M$\\frac$ <b>2024", "Aurora_Nova_2019_2023": "$x^2$",
             "Borealis_Lynx_2016_2018": "one $ sign & more"}
    rename_classes(art, names, {"Aurora": "$\\alpha$ur<i>ora</i>"})
    data = tmp_path / "data"
    shutil.copytree(few, data)
    for old, new in names.items():
        (data / old).rename(data / new)
    out = tmp_path / "report"
    m = _report(art, data, out, capsys)
    assert m["images"] == 24 and set(names.values()) <= {c["class"] for c in m["worst_classes"]}
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "M$\\frac$ &lt;b&gt;2024" in html and "<b>2024" not in html      # a folder name holds no "/"
    assert "one $ sign &amp; more" in html and "$x^2$" in html
    assert (out / "confusion_brand.png").stat().st_size > 5000


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


def test_photos_of_the_training_folder_are_counted_for_an_ensemble_and_never_crash_it(tmp_path):
    """An ensemble has no train.json of its own: its members' say where they trained (the report said
    nothing); a damaged train.json counts nothing (it was a traceback)."""
    import json

    from hier.artifact.files import ENSEMBLE, MEMBERS, TRAIN_RUN
    from hier.report.build import in_training_folder
    data = tmp_path / "data"
    (data / "A").mkdir(parents=True)
    photos = [data / "A" / "1.jpg", tmp_path / "elsewhere.jpg"]
    ensemble = tmp_path / "ens"
    for i in range(2):
        (ensemble / MEMBERS / str(i)).mkdir(parents=True)
        (ensemble / MEMBERS / str(i) / TRAIN_RUN).write_text(json.dumps({"data": str(data)}))
    (ensemble / ENSEMBLE).write_text("{}")
    assert in_training_folder(ensemble, photos) == 1
    for damaged in ("[1, 2]", json.dumps({"data": ["x"]}), json.dumps({"data": None})):
        (ensemble / MEMBERS / "0" / TRAIN_RUN).write_text(damaged)
        (ensemble / MEMBERS / "1" / TRAIN_RUN).write_text(damaged)
        assert in_training_folder(ensemble, photos) == 0
