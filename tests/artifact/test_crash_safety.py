"""Every writer of several files, killed before each step of its commit in turn: the next reader sees the
whole new version the killed writer was committing (every file of it, byte for byte: never a mixture of
two versions), and it answers (SQLite's crash tests, with ``hier.journal.step`` as
the fault injector: the writer is a forked process that exits at the k-th step, as a ``kill -9`` would
leave it).

Before the journal, a gallery save renamed ``index.faiss``, ``listings.csv`` and ``gallery.json`` one by
one: killed after the first, the gallery loaded silently and ``similar`` raised ``KeyError``; after the
second, the next add reused ids of existing listings; mid-merge, listings ended up in two shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import photos_of
from hier import artifact, enrollment, fileio, journal
from hier.export import auto, export
from hier.gallery import ID, Gallery
from hier.services import indexing
from hier.training.config import TrainConfig
from hier.training.finish import finish

NEW = "Zephyr_Gale_2025_2025"
KILLED = 77


def _listings(demo_data, folder: Path, classes: tuple[str, ...], n: int = 4) -> Path:
    """A listings folder of ``n`` photos of each class (ids: class/photo name)."""
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for p in photos_of(demo_data, cls, n):
            shutil.copy(p, folder / cls / p.name)
    return folder


def _end_of_training(art: Path, demo_data) -> None:
    """``hier train``'s last commit (statistics, validation, out-of-fold scores, metrics, config), on the
    artifact's own weights."""
    net, taxonomy = artifact.load(art)
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))
    y = np.array([taxonomy.class_index[p.parent.name] for p in photos])
    trainer = SimpleNamespace(out=art, taxonomy=taxonomy, cfg=TrainConfig(export=False), dev="cpu",
                              console=Console(quiet=True), merged={}, data_dir=demo_data.train_dir)
    finish(trainer, photos[::2], y[::2], photos[1::2], y[1::2])


def _stale_export(art: Path) -> None:
    """An export of other weights (as after ``hier train --resume``): ``hier export`` writes both files."""
    config = artifact.read_config(art)
    config["onnx"]["fingerprint"] = "other weights"
    fileio.write_json(art / artifact.CONFIG, config)
    (art / artifact.ONNX).write_bytes(b"an older export")


def _writers(demo_data, work: Path) -> dict:
    """name -> (set-up, the write killed at each step): every multi-file writer of hier."""
    base = _listings(demo_data, work / "base", ("Cinder_Rook_2019_2023", "Aurora_Nova_2015_2018"))
    more = _listings(demo_data, work / "more", ("Borealis_Lynx_2016_2018",))
    later = _listings(demo_data, work / "later", ("Cinder_Pike_2015_2018",))
    shots = photos_of(demo_data, "Borealis_Orca_2019_2023", 5)

    def built(art):
        indexing.build(art, base)

    def sharded(art):
        indexing.build(art, base)
        indexing.add(art, more, shard="s1")
        indexing.add(art, later, shard="s2")
    return {
        "index build": (None, lambda art: indexing.build(art, base)),
        "index add": (built, lambda art: indexing.add(art, more)),
        "index add --shard": (built, lambda art: indexing.add(art, more, shard="s1")),
        "index remove": (built, lambda art: indexing.remove(art, ["Cinder_Rook_2019_2023/" + p.stem for p in
                                                                   photos_of(demo_data, "Cinder_Rook_2019_2023", 2)])),
        "index rebuild": (built, lambda art: indexing.rebuild(art, "ivf")),
        "index drop": (sharded, lambda art: indexing.drop(art, "s1")),
        "index merge": (sharded, lambda art: indexing.merge(art, ["s1", "s2"], "s1")),
        "enroll": (None, lambda art: enrollment.enroll(art, NEW, shots, brand="Zephyr")),
        "enroll --add-shots": (lambda art: enrollment.enroll(art, NEW, shots[:2], brand="Zephyr"),
                               lambda art: enrollment.enroll(art, NEW, shots[2:], add_shots=True)),
        "unenroll": (lambda art: enrollment.enroll(art, NEW, shots, brand="Zephyr"),
                     lambda art: enrollment.unenroll(art, NEW)),
        "export": (_stale_export, export),
        "end of training": (None, lambda art: _end_of_training(art, demo_data)),
    }


def _state(art: Path) -> dict[str, str]:
    """Every file of the artifact (gallery included) but the lock and a commit's journal, by content."""
    return {p.relative_to(art).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(art.rglob("*"))
            if p.is_file() and p.name != fileio.LOCK and p.name != journal.JOURNAL}


def _committing(art: Path) -> dict[str, str]:
    """The version a killed writer was committing: the files on disk with the journal's remaining renames
    and removals done (what no reader may see half of)."""
    record = json.loads((art / journal.JOURNAL).read_text(encoding="utf-8"))
    state = _state(art)
    for tmp, final in record["renames"]:
        if (art / tmp).exists():
            state[final] = state.pop(tmp)
    for gone in record["remove"]:
        state = {f: h for f, h in state.items() if f != gone and not f.startswith(gone + "/")}
    return state


def _killed_at(art: Path, write, k: int) -> dict[str, str] | None:
    """Run ``write(art)`` in a forked process that exits at the k-th step of a commit, as ``kill -9`` would
    stop it; the version it was committing then, or None when it finished with fewer steps."""
    expected = art.with_name(art.name + ".committing.json")
    pid = os.fork()
    if pid == 0:                                   # the writer: no test machinery may run here
        code = 1
        try:
            torch.set_num_threads(1)               # a forked child must not use the parent's OpenMP pools,
            faiss.omp_set_num_threads(1)
            auto.onnx_providers = lambda: []       # nor OpenVINO or ONNX Runtime (they hang after a fork)
            calls = [0]

            def step():
                calls[0] += 1
                if calls[0] == k:
                    expected.write_text(json.dumps(_committing(art)))
                    os._exit(KILLED)
            journal.step = step
            write(art)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail(f"the writer did not end within 120 s (step {k})")
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, KILLED), f"the writer failed at step {k} (exit {code})"
    return json.loads(expected.read_text()) if code == KILLED else None


def _answers(art: Path) -> None:
    """The version on disk reads and answers: the model loads, the gallery (if any) searches."""
    net, taxonomy = artifact.load(art)
    if (art / artifact.GALLERY).is_dir():
        gallery = Gallery.load(art)
        table = gallery.results(np.eye(1, net.cfg.embed_dim, dtype=np.float32), 3)[0]
        assert len(table) == min(3, len(gallery)) and table[ID].is_unique


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["index build", "index add", "index add --shard", "index remove",
                                    "index rebuild", "index drop", "index merge", "enroll", "enroll --add-shots",
                                    "unenroll", "export", "end of training"])
def test_a_writer_killed_at_any_step_leaves_the_whole_old_or_the_whole_new_version(writer, tiny_artifact,
                                                                                   demo_data, tmp_path):
    setup, write = _writers(demo_data, tmp_path)[writer]
    start = tmp_path / "start"
    shutil.copytree(tiny_artifact[0], start)
    if setup is not None:
        setup(start)
    old = _state(start)
    steps = 0
    for k in range(1, 50):
        art = tmp_path / f"killed{k}"
        shutil.copytree(start, art)
        committing = _killed_at(art, write, k)
        if committing is None:
            break
        steps = k
        assert committing != old
        with fileio.locked(art):                   # the next reader: completes the killed commit first
            assert not (art / journal.JOURNAL).exists()
        got = _state(art)
        differ = sorted(f for f in set(got) | set(committing) if got.get(f) != committing.get(f))
        assert not differ, f"step {k} of {writer!r}: a mixture of versions ({differ[:6]} are not the killed commit's)"
        _answers(art)
    assert steps >= 2, f"{writer!r} committed in {steps} step(s): not a multi-file commit"
    print(f"{writer}: killed at each of {steps} steps, every time the whole version it was committing")
