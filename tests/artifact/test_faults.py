"""Nothing lost under faults: a read-only artifact, outputs that would replace an input or an artifact's
file, shards of two launches, an ensemble written inside a member, enrolling into a member, an exclude
list that empties a class. Each was reproduced before its fix (the docstrings say how it went)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import error_line_only, photos_of, run_cli, small_dataset, tree
from hypothesis import given, settings
from hypothesis import strategies as st

from hier import fileio
from hier.artifact.records import read_oof
from hier.data.exclude import format_exclude, parse_exclude
from hier.errors import HierError
from hier.gallery import read_listings
from hier.services import embedding


@pytest.fixture
def read_only(art, tmp_path):
    """The artifact (``ro/artifact``) and an empty folder (``ro/outputs``) through a read-only bind mount
    (a Docker ``:ro`` volume); skipped where mounting is not allowed."""
    src, view = tmp_path / "src", tmp_path / "ro"
    shutil.copytree(art, src / "artifact")
    (src / "outputs").mkdir()
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src), str(view)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode == 0
    if not mounted:
        subprocess.run(["umount", str(view)], capture_output=True)
        pytest.skip("a read-only bind mount needs root (mount --bind)")
    try:
        yield view / "artifact"
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_a_read_only_artifact_answers_with_one_warning(read_only, demo_data, tmp_path, capsys):
    """Before: opening ``.hier.lock`` raised ``OSError: [Errno 30] Read-only file system`` in every command,
    even with the lock file there; ``hier serve`` exited 3. ``predict --out`` into the volume: a traceback."""
    photo = photos_of(demo_data, n=1)[0]
    code, out, err = run_cli("predict", read_only, photo, "--format", "json", capsys=capsys)
    assert code == 0 and '"brand"' in out, err
    assert err.count("read-only here: read without its lock") == 1
    code, _, err = run_cli("evaluate", read_only, demo_data.train_dir, capsys=capsys)
    assert code == 0, err
    code, _, err = run_cli("predict", read_only, photo, "--out", read_only.parent / "outputs" / "a.csv",
                           capsys=capsys)
    assert error_line_only(code, err) and "not writable" in err, err
    code, _, err = run_cli("enroll", read_only, "--class", "Zephyr_Gale_2025_2025", "--brand", "Zephyr",
                           "--images", photo, capsys=capsys)
    assert code == 2 and "Read-only file system" in err and "Traceback" not in err, err


@pytest.mark.parametrize("target", ["test_csv", "sample", "config.json", "folder"])
def test_predict_out_never_replaces_an_input_or_an_artifact_file(target, art, demo_data, tmp_path, capsys):
    """Before: ``--out`` equal to ``--test-csv`` or ``--sample-submission`` replaced the user's file (exit 0),
    and ``--out ART/config.json`` bricked the artifact for good."""
    test_csv, sample = tmp_path / "test.csv", tmp_path / "sample.csv"
    shutil.copy(demo_data.test_csv, test_csv)
    shutil.copy(demo_data.sample_submission, sample)
    out = {"test_csv": test_csv, "sample": sample, "config.json": art / "config.json",
           "folder": tmp_path}[target]
    before = tree(tmp_path)
    code, _, err = run_cli("predict", art, "--test-csv", test_csv, "--sample-submission", sample, "--out", out,
                           capsys=capsys)
    assert error_line_only(code, err), err
    assert ("which this command reads" if target in ("test_csv", "sample") else
            "inside the artifact" if target == "config.json" else "is a folder") in err
    assert tree(tmp_path) == before


def test_shards_of_two_launches_over_other_listings_never_mix(art, demo_data, tmp_path, capsys):
    """Before: a listing added between two ``hier embed`` launches with the same N disappeared from the
    gallery ("indexed 61", exit 0); ``--out`` an existing file was a traceback."""
    photos = photos_of(demo_data, n=6)
    first = pd.DataFrame({"listing_id": [f"L{i}" for i in range(5)], "image": [str(p) for p in photos[:5]]})
    second = pd.DataFrame({"listing_id": [f"L{i}" for i in range(6)], "image": [str(p) for p in photos]})
    out = tmp_path / "emb"
    embedding.embed(art, first, out, (0, 2))
    embedding.embed(art, second, out, (1, 2))
    with pytest.raises(HierError, match="launches over different listings"):
        embedding.read_embeddings(out)
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli("embed", art, tmp_path / "emb", "--out", tmp_path / "file", capsys=capsys)
    assert error_line_only(code, err) and (tmp_path / "file").read_text() == "mine", err


def test_two_writers_of_one_part_land_once(tmp_path):
    """Before: two ``hier embed`` of the same shard at once both reported success and the part held one
    run's rows. A part is created exclusively: the second writer is told, and the first run's file stays."""
    part = tmp_path / "part-00000-of-00001.parquet"

    def second_arrives_meanwhile(path: Path) -> None:
        path.write_text("first")
        assert fileio.atomic_create(part, lambda p: p.write_text("second")) is True
    assert fileio.atomic_create(part, second_arrives_meanwhile) is False
    assert part.read_text() == "second" and not list(tmp_path.glob(".*.tmp"))


def test_an_ensemble_is_never_written_inside_a_member_nor_a_member_enrolled_into(art, demo_data, tmp_path,
                                                                                 monkeypatch, capsys):
    """Before: ``hier ensemble A B --out A/E`` recursed into a ``RecursionError`` and left ~1,000 nested
    folders in A; enrolling into ``E/members/<i>`` was accepted, after which every command on E said it
    was damaged."""
    other = tmp_path / "other"
    shutil.copytree(art, other)
    config = fileio.read_json(other / "config.json")
    config["fingerprint"] = "another model's"                  # as two trained models would differ
    fileio.write_json(other / "config.json", config)
    before = tree(art)
    code, _, err = run_cli("ensemble", art, other, "--out", art / "E", "--weights", "equal", capsys=capsys)
    assert error_line_only(code, err) and "inside the member" in err, err
    assert tree(art) == before
    ensemble = tmp_path / "E"
    monkeypatch.setattr(fileio, "UMASK", 0o002)                 # the process's umask, read at import
    code, _, err = run_cli("ensemble", art, other, "--out", ensemble, "--weights", "equal", capsys=capsys)
    assert code == 0, err
    assert ensemble.stat().st_mode & 0o777 == 0o775             # the umask's, not mkdtemp's 0700
    member = ensemble / "members" / "0"
    code, _, err = run_cli("enroll", member, "--class", "Zephyr_Gale_2025_2025", "--brand", "Zephyr", "--images",
                           photos_of(demo_data, n=2)[0], capsys=capsys)
    assert error_line_only(code, err) and "is a member of the ensemble" in err, err


def test_an_exclude_list_that_empties_a_class_is_refused_before_any_work(demo_data, tmp_path, capsys):
    """Before: refused only after the whole run ("the class statistics have no ..."), the rerun refused
    (folder not empty), and ``hier predict`` served the leftover folder ranking a class without photos."""
    cls = "Cinder_Rook_2019_2023"
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("".join(f"{cls}/{p.name}\n" for p in photos_of(demo_data, cls)), encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli("train", demo_data.train_dir, "--out", out, "--model", "test_efficientnet",
                           "--pretrained", "none", "--epochs", "1", "--exclude", exclude, capsys=capsys)
    assert error_line_only(code, err) and f"leaves class '{cls}' without photos" in err, err
    assert not out.exists()


def test_a_gallery_of_two_versions_is_one_line_naming_the_repair(art, demo_data, capsys):
    """Files of two versions of a gallery (copied by hand, or a crash of an older hier between renames):
    before, it loaded silently and ``similar`` raised ``KeyError``."""
    code, _, err = run_cli("index", "build", art, demo_data.train_dir, capsys=capsys)
    assert code == 0, err
    listings = art / "gallery" / "listings.csv"
    table = pd.read_csv(listings, dtype=str, keep_default_na=False)
    table.iloc[:-3].to_csv(listings, index=False)
    code, _, err = run_cli("similar", art, photos_of(demo_data, n=1)[0], capsys=capsys)
    assert error_line_only(code, err) and "of two versions" in err and "hier index rebuild" in err, err


def test_listings_read_before_the_listings_folder_moves(demo_data, tmp_path):
    """``read_listings`` resolves photo paths: a launch's digest names listings, not where they are
    mounted (machines mounting the data elsewhere make one launch)."""
    folder = tmp_path / "a"
    shutil.copytree(demo_data.train_dir / "Cinder_Rook_2019_2023", folder / "Cinder_Rook_2019_2023")
    moved = tmp_path / "b"
    shutil.copytree(folder, moved)
    assert embedding.listings_digest(read_listings(folder)) == embedding.listings_digest(read_listings(moved))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that fills up (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("a tmpfs mount needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tiny_disk):
    """Before: torch's writer raised ``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos``, hiding ENOSPC, and a training run ended in a traceback."""
    import torch

    from hier.training.trainer import _torch_save
    with pytest.raises(HierError, match="no space left on device"):
        fileio.atomic_write(tiny_disk / "checkpoint.pt", lambda p: _torch_save({"w": torch.zeros(200_000)}, p))
    assert not list(tiny_disk.iterdir())


def test_a_full_disk_under_the_int8_quantizer_is_one_line(art, monkeypatch, capsys):
    """Before: a bare ``OSError`` from the quantizer's own writes ended ``hier export --int8`` in a
    traceback."""
    import errno

    from hier.export import int8

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(int8, "quantize_int8", full)
    before = tree(art)
    code, _, err = run_cli("export", art, "--int8", capsys=capsys)
    assert error_line_only(code, err) and "no space left on device" in err, err
    assert tree(art) == before


def test_the_service_answers_503_while_its_artifact_is_gone(art, demo_data):
    """Before: ``/predict`` answered 400 (the client's mistake) while the artifact folder was being
    replaced; it is a state to retry after."""
    from fastapi.testclient import TestClient

    from hier.serve import create_app
    photo = photos_of(demo_data, n=1)[0].read_bytes()
    with TestClient(create_app(art)) as client:
        assert client.post("/predict", files={"file": ("a.jpg", photo, "image/jpeg")}).status_code == 200
        (art / "config.json").rename(art / "config.json.moved")
        r = client.post("/predict", files={"file": ("a.jpg", photo, "image/jpeg")})
        assert r.status_code == 503 and "no longer a hier artifact" in r.json()["detail"], r.text
        assert r.headers["Retry-After"] == "1"
        r = client.post("/similar", files={"file": ("a.jpg", photo, "image/jpeg")})
        assert r.status_code == 503, r.text                   # not "build an index" (a hostile review's find)
        (art / "config.json.moved").rename(art / "config.json")
        assert client.post("/predict", files={"file": ("a.jpg", photo, "image/jpeg")}).status_code == 200


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\x00"), min_size=1), max_size=8))
def test_every_path_the_audit_lists_is_the_path_training_leaves_out(names):
    """Before: the reader stripped spaces and dropped lines starting with ``#`` while the writer wrote raw
    paths, and a line break in a name split it (the audit listed 6 photos, training left out 2)."""
    assert parse_exclude(format_exclude(names)) == names


def test_a_resumed_run_keeps_the_exclude_list_it_started_with(demo_data, tmp_path, capsys):
    """Before: editing the ``--exclude`` file between the runs changed the resumed run's validation split
    with no word (8 of 23 new validation photos had been trained on in epoch 1)."""
    data = small_dataset(demo_data, tmp_path / "data", classes=3, per_class=12)
    photos = sorted(data.glob("*/*.jpg"))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(format_exclude([p.relative_to(data).as_posix() for p in photos[:2]]), encoding="utf-8")
    out = tmp_path / "run"
    flags = ["--model", "test_efficientnet", "--pretrained", "none", "--img-size", "64", "--batch-size", "8",
             "--exclude", exclude, "--no-export"]
    code, _, err = run_cli("train", data, "--out", out, "--epochs", "1", *flags, capsys=capsys)
    assert code == 0, err
    first = sorted(read_oof(out / "oof.npz")["paths"])
    exclude.write_text(format_exclude([p.relative_to(data).as_posix() for p in photos[5:9]]), encoding="utf-8")
    code, _, err = run_cli("train", data, "--out", out, "--resume", "--epochs", "2", capsys=capsys)
    assert code == 0, err
    assert "changed since the run started" in " ".join(err.split())
    assert sorted(read_oof(out / "oof.npz")["paths"]) == first


def test_the_audit_near_duplicate_search_is_linear_in_photos():
    """Before: every pair above the threshold was built in Python before any cap (2,000 near-identical
    photos: 313k pairs, 1.95 GB, 8.5 min). Now each photo's nearest only: memory linear in photos, and
    every photo still linked to a copy."""
    import tracemalloc

    from hier.audit.find import NEAR_PER_PHOTO, near_duplicates
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 64)) + 0.001 * rng.normal(size=(2000, 64))
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    tracemalloc.start()
    pairs = near_duplicates(z, 0.93)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(pairs) <= NEAR_PER_PHOTO * len(z) and peak < 50e6, (len(pairs), peak)
    assert {i for p in pairs for i in p[:2]} == set(range(len(z)))
    assert len({(i, j) for i, j, _ in pairs}) == len(pairs) and all(i < j for i, j, _ in pairs)


@pytest.mark.parametrize("mode", ["test_csv", "folder"])
def test_predict_out_never_replaces_a_photo_it_reads(mode, art, demo_data, tmp_path, capsys):
    """Found by a hostile review: ``--out`` a photo the test CSV lists, or a photo of a folder given,
    replaced that JPEG with the CSV (exit 0)."""
    photos = tmp_path / "photos"
    shutil.copytree(demo_data.train_dir / "Cinder_Rook_2019_2023", photos)
    victim = sorted(photos.glob("*.jpg"))[0]
    before = tree(tmp_path)
    if mode == "test_csv":
        csv = tmp_path / "test.csv"
        pd.DataFrame({"ID": ["A"], "img_path": [f"photos/{victim.name}"]}).to_csv(csv, index=False)
        sample = tmp_path / "sample.csv"
        pd.DataFrame({"ID": ["A"], **{c: [0.0] for c in ["Cinder_Rook_2019_2023"]}}).to_csv(sample, index=False)
        before = tree(tmp_path)
        args = ["--test-csv", csv, "--sample-submission", sample]
    else:
        args = [photos]
    code, _, err = run_cli("predict", art, *args, "--out", victim, capsys=capsys)
    assert code == 2 and "which this command reads" in err and "Traceback" not in err, err
    assert tree(tmp_path) == before


def test_a_full_disk_for_the_journal_itself_is_one_line(art, demo_data, monkeypatch, capsys):
    """Found by a hostile review: no space left when the commit's journal was written ended in a
    traceback (nothing had been renamed yet)."""
    import errno

    from hier import journal

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(journal.json, "dump", full)
    before = tree(art)
    code, _, err = run_cli("enroll", art, "--class", "Zephyr_Gale_2025_2025", "--brand", "Zephyr", "--images",
                           photos_of(demo_data, n=3)[0], capsys=capsys)
    assert error_line_only(code, err) and "no space left on device" in err, err
    assert tree(art) == before


def test_an_unfinished_commit_seen_read_only_is_named(read_only, demo_data, tmp_path, capsys):
    """Found by a hostile review: a killed writer's journal seen through a read-only mount (where it cannot
    be completed) was read as a damaged artifact ("retrain")."""
    from hier import journal
    source = tmp_path / "src" / "artifact"                 # the writable side of the same folder
    (source / journal.JOURNAL).write_text('{"renames": [], "remove": []}', encoding="utf-8")
    code, _, err = run_cli("predict", read_only, photos_of(demo_data, n=1)[0], capsys=capsys)
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "unfinished commit" in err and "Traceback" not in err
