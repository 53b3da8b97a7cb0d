"""The file layer (``hier.fileio``) under the commands that write an artifact: its lock, its atomic writes
and the file modes they leave, and text read and written as UTF-8 whatever the locale.

Concurrent writers (issue 7): `hier enroll` and `hier index add` started together while another command
holds the lock wait and then all land, a lock held too long is one line, and a property test drives random
sequences of enroll / unenroll / index add / remove, some of them two at once, and checks the artifact
afterwards. File modes (issue 15, item 9): a trained artifact is readable as the umask allows; a replaced
file keeps its mode. UTF-8 (issue 15, item 11): the modules that read users' files name the encoding."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, image_flags, one_error_line_after_warnings, photos_of, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hier import artifact, enrollment, fileio
from hier.artifact.files import STATISTICS
from hier.errors import HierError
from hier.gallery import Gallery
from hier.models.statistics import ClassStatistics
from hier.services import indexing

# --- concurrent writers (issue 7, item 2) ---------------------------------------------------------------

def _hier(*args, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "hier", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)


@pytest.mark.slow
def test_two_processes_writing_at_once_both_land(art, demo_data, tmp_path):
    """Two `hier enroll` and two `hier index add` started together on one artifact while another
    command holds its lock: each says it waits, none writes until the lock is free, then all land.
    Before the lock, both enrolls exited 0 and one class was gone (3 of 3 trials), and index adds lost
    listings (6 of 6)."""
    from filelock import FileLock
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))
    assert run_cli("index", "build", art, demo_data.train_dir / "Aurora_Nova_2015_2018")[0] == 0
    n0 = len(Gallery.load(art))
    batches = []
    for b in range(2):
        folder = tmp_path / f"listings{b}"
        folder.mkdir()
        for i, p in enumerate(photos[b * 7:(b + 1) * 7]):
            shutil.copy(p, folder / f"B{b}_{i}.jpg")
        batches.append(folder)
    shots = photos_of(demo_data, "Cinder_Rook_2019_2023")[:4]
    commands = [("enroll", art, "--class", f"Zephyr_Gale{i}_2025_2025", "--brand", "Zephyr", *image_flags(shots))
                for i in range(2)] + [("index", "add", art, folder) for folder in batches]
    logs = [tmp_path / f"stderr{i}.txt" for i in range(len(commands))]
    before = artifact.read_config(art)
    holder = FileLock(art / ".hier.lock", thread_local=False)
    with ThreadPoolExecutor(1) as pool:           # the lock held as another command would
        pool.submit(holder.acquire).result()
        try:
            procs = [_hier(*c, stderr=log.open("w")) for c, log in zip(commands, logs)]
            deadline = time.monotonic() + 240
            while not all("waiting for it" in log.read_text() for log in logs):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    [log.read_text()[-300:] for log in logs]
                time.sleep(0.2)
            assert artifact.read_config(art) == before                   # nobody wrote meanwhile
        finally:
            pool.submit(holder.release).result()
    results = [p.communicate(timeout=300)[0:1] + (p.returncode,) for p in procs]
    assert all(code == 0 for *_, code in results), [log.read_text()[-300:] for log in logs]
    net, tax = artifact.load(art)
    assert {"Zephyr_Gale0_2025_2025", "Zephyr_Gale1_2025_2025"} <= set(tax.classes)
    assert len(tax) == 14 and net.fine.weight.shape[0] == 14
    assert len(artifact.read_config(art)["enrolled"]) == 2
    gallery = Gallery.load(art)
    assert len(gallery) == n0 + 14 == len(gallery.listings)
    assert {f"B{b}_{i}" for b in range(2) for i in range(7)} <= set(gallery.listings["listing_id"])


def test_a_busy_artifact_is_refused_with_one_line_after_the_timeout(art, monkeypatch, capsys):
    from filelock import FileLock
    monkeypatch.setattr(fileio, "LOCK_TIMEOUT", 0.2)
    holder = FileLock(art / ".hier.lock", thread_local=False)
    with ThreadPoolExecutor(1) as pool:        # another thread holds the lock, as another process would
        pool.submit(holder.acquire).result()
        try:
            code, _, err = run_cli("unenroll", art, "--class", "X", capsys=capsys)
        finally:
            pool.submit(holder.release).result()
    assert one_error_line_after_warnings(code, err) and "busy" in err


# --- property: any sequence of writers, some at once, leaves a consistent artifact ----------------------

OPS = st.lists(st.tuples(st.sampled_from(["enroll", "unenroll", "add", "remove"]), st.integers(0, 2),
                         st.booleans()), min_size=2, max_size=6)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS)
def test_any_sequence_of_writers_leaves_a_consistent_artifact(ops, tiny_artifact, demo_data, tmp_path_factory):
    art = tmp_path_factory.mktemp("prop") / "artifact"
    shutil.copytree(tiny_artifact[0], art)
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))
    indexing.build(art, demo_data.train_dir / "Aurora_Nova_2015_2018")
    base_ids = set(Gallery.load(art).listings["listing_id"])
    enrolled, listed, counter = set(), set(base_ids), iter(range(1000))

    def do(op, i):
        """One writer; returns what it reports as done (or None where it refused)."""
        if op == "enroll":
            name = f"Neu{i}_Wagen_2025_2025"
            enrollment.enroll(art, name, photos[i * 5:i * 5 + 3], brand="Neu")
            return ("enrolled", name)
        if op == "unenroll":
            name = f"Neu{i}_Wagen_2025_2025"
            try:
                enrollment.unenroll(art, name)
            except HierError:       # not enrolled (yet): a refusal, nothing done
                return None
            return ("unenrolled", name)
        if op == "add":
            folder = art.parent / f"batch{next(counter)}"
            folder.mkdir()
            for j, p in enumerate(photos[i * 9:i * 9 + 2]):
                shutil.copy(p, folder / f"{folder.name}_{j}.jpg")
            indexing.add(art, folder)
            return ("added", {f"{folder.name}_{j}" for j in range(2)})
        ids = sorted(base_ids)[i:i + 1]
        try:
            indexing.remove(art, ids)
        except HierError:           # already removed
            return None
        return ("removed", set(ids))

    k = 0
    while k < len(ops):
        together = ops[k][2] and k + 1 < len(ops)
        if together and {ops[k][0], ops[k + 1][0]} == {"enroll", "unenroll"} and ops[k][1] == ops[k + 1][1]:
            together = False                   # which of the two lands first is a race: no single answer
        step = ops[k:k + 2] if together else ops[k:k + 1]
        with ThreadPoolExecutor(len(step)) as pool:
            done = list(pool.map(lambda o: do(o[0], o[1]), step))
        for d in filter(None, done):
            what, value = d
            if what == "enrolled":
                enrolled.add(value)
            elif what == "unenrolled":
                enrolled.discard(value)
            elif what == "added":
                listed |= value
            else:
                listed -= value
        k += len(step)

    net, tax = artifact.load(art)                                   # loads: weights fit the taxonomy
    entries = artifact.read_config(art).get("enrolled", [])
    assert {e["class"] for e in entries} == enrolled <= set(tax.classes)
    assert len(tax) == 12 + len(enrolled) == net.fine.weight.shape[0]
    assert net.model.weight.shape[0] == len(tax.models) and net.brand.weight.shape[0] == len(tax.brands)
    stats = ClassStatistics.load(art / STATISTICS)
    assert set(stats.classes) == set(tax.classes) and int((stats.shot_counts > 0).sum()) == len(entries)
    gallery = Gallery.load(art)
    assert set(gallery.listings["listing_id"]) == listed and len(gallery) == len(listed)


# --- file modes (issue 15, item 9) ----------------------------------------------------------------------

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


# --- UTF-8 everywhere (issue 15, item 11) ---------------------------------------------------------------

MINE = ["hier/data/images.py", "hier/data/files.py", "hier/data/readers.py", "hier/data/detect.py", "hier/data/tables.py",
        "hier/data/__init__.py", "hier/competitions/hecto.py", "hier/gallery/listings.py", "hier/gallery/store.py",
        "hier/services/indexing.py", "hier/cli/predict.py", "hier/cli/index.py"]


def _text_io_without_encoding(source: str) -> list[int]:
    """Lines of calls that read or write text in the locale's encoding: open(..)/Path.open(..) in a text
    mode, read_text(), write_text(), to_csv(path) without encoding=."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in ("open", "read_text", "write_text", "to_csv"):
            continue
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") in ("Image", "os"):
            continue                       # PIL's Image.open reads bytes; os.open gives a descriptor, no text
        if any(k.arg == "encoding" for k in node.keywords):
            continue
        modes = [a.value for a in node.args + [k.value for k in node.keywords if k.arg == "mode"]
                 if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if name == "open" and any("b" in m for m in modes):
            continue
        if name == "to_csv" and any(k.arg == "index" for k in node.keywords) and not node.args:
            continue                       # to_csv(index=False) into a string: no file, no encoding
        lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", MINE)
def test_every_text_file_is_read_and_written_as_utf8(path):
    assert _text_io_without_encoding((ROOT / path).read_text(encoding="utf-8")) == [], path


@pytest.mark.parametrize("entry", [{"renames": [["../outside.tmp", "x"]], "remove": []},
                                   {"renames": [], "remove": ["/etc/hostname"]},
                                   {"renames": [], "remove": ["../victim"]},
                                   {"renames": [], "remove": ["link/victim"]},
                                   {"renames": {"ab": 1}, "remove": "cd"},
                                   "not json"])
def test_a_crafted_journal_renames_and_deletes_nothing_outside_its_folder(entry, tmp_path):
    """A journal is read by every command that takes an artifact's lock: one planted in a downloaded
    artifact must not make hier rename or delete anything outside that folder."""
    from hier import journal
    art, victim = tmp_path / "art", tmp_path / "victim"
    art.mkdir()
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    (art / "link").symlink_to(tmp_path)
    (art / journal.JOURNAL).write_text(entry if isinstance(entry, str) else json.dumps(entry), encoding="utf-8")
    with pytest.raises(HierError, match="outside|not a commit"):
        with fileio.locked(art):
            pass
    assert (victim / "precious.txt").read_text() == "mine"


def test_a_journal_that_cannot_be_completed_is_one_line(tmp_path):
    """A journal renaming onto a folder (found by a hostile review): ``IsADirectoryError`` was a traceback."""
    from hier import journal
    (tmp_path / "log.csv").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / journal.JOURNAL).write_text('{"renames": [["log.csv", "d"]], "remove": []}', encoding="utf-8")
    with pytest.raises(HierError, match="could not be completed"):
        with fileio.locked(tmp_path):
            pass
