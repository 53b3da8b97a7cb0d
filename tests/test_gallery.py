"""The gallery's writers embed outside the artifact's lock and check before any work (issue 15, items 5
and 12): a reader can take the lock while `index build/add` embeds, a change of the weights meanwhile is
noticed, two adds at once both land, clashing ids and a mismatched sample submission are refused before
a single photo is embedded."""
import shutil
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import hier.index
from hier import artifact, fileio, index
from hier.recognizer import Recognizer
from hier.engine.predictor import Predictor
from hier.errors import HierError

from conftest import run_cli


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def _listings(demo_data, tmp_path, name, n=4, start=0):
    folder = tmp_path / name
    folder.mkdir()
    for i, p in enumerate(sorted(demo_data.train_dir.glob("*/*.jpg"))[start:start + n]):
        shutil.copy(p, folder / f"{name}_{i}.jpg")
    return folder


@pytest.fixture
def calls(monkeypatch):
    """Wrap the predictor ``index`` embeds with: ``calls.before(n)`` runs before embedding call n (from 1);
    ``calls.n`` counts calls."""
    class Calls:
        n = 0
        before = staticmethod(lambda n: None)
    real = hier.index.artifact_predictor

    def wrapped(*a, **k):
        predictor = real(*a, **k)

        def call(images, progress=None, **kw):
            Calls.n += 1
            Calls.before(Calls.n)
            return predictor(images, progress, **kw)
        return call
    monkeypatch.setattr(hier.index, "artifact_predictor", wrapped)
    return Calls


def _in_thread(fn, *args):
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:          # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, box


# --- 5. the lock is held only to check and save --------------------------------------------------------

@pytest.mark.parametrize("op", ["build", "add"])
def test_a_reader_takes_the_lock_while_the_index_embeds(op, art, demo_data, tmp_path, calls):
    """`index build/add` held the artifact's lock for the whole embedding: a service waited ~25 s."""
    if op == "add":
        index.build(art, _listings(demo_data, tmp_path, "first"))
    folder = _listings(demo_data, tmp_path, "new", start=10)
    embedding, go = threading.Event(), threading.Event()

    def block(n):
        embedding.set()
        assert go.wait(60)
    calls.before = block
    t, box = _in_thread(index.build if op == "build" else index.add, art, folder)
    try:
        assert embedding.wait(60)
        with fileio.locked(art, timeout=0.5):     # a reader (the service) gets in at once
            net, tax = artifact.load(art)
    finally:
        go.set()
        t.join(120)
    assert "error" not in box, box.get("error")
    gallery = index.Gallery.load(art)
    assert {f"new_{i}" for i in range(4)} <= set(gallery.listings["listing_id"])
    assert len(gallery) == (8 if op == "add" else 4)


def _flip_embedding(art):
    """Save the artifact with the embedding layer negated: every embedding changes sign."""
    net, tax = artifact.load(art)
    with torch.no_grad():
        for p in net.neck.parameters():
            if p.ndim > 1:
                p.mul_(-1)
    artifact.save(art, net, tax)


def test_weights_changed_during_the_embedding_are_noticed(art, demo_data, tmp_path, calls):
    folder = _listings(demo_data, tmp_path, "new")
    before = Predictor(artifact.load(art)[0])(sorted(folder.iterdir()))["embedding"]
    calls.before = lambda n: _flip_embedding(art) if n == 1 else None
    gallery = index.build(art, folder)
    assert calls.n == 2                                           # embedded again with the new weights
    after = Predictor(artifact.load(art)[0])(sorted(folder.iterdir()))["embedding"]
    assert np.abs(after - before).max() > 0.1                     # the change is real
    ids = gallery.listings.set_index("listing_id")["hier_id"]
    saved = np.stack([gallery.index.reconstruct(int(ids[p.stem])) for p in sorted(folder.iterdir())])
    assert np.abs(saved - after).max() < 1e-5


def test_an_artifact_that_keeps_changing_is_one_line_and_nothing_saved(art, demo_data, tmp_path, calls,
                                                                       capsys):
    calls.before = lambda n: _flip_embedding(art)
    code, _, err = run_cli("index", "build", art, _listings(demo_data, tmp_path, "new"), capsys=capsys)
    last = err.strip().splitlines()[-1]                        # after the embeddings' progress bars
    assert code == 2 and "Traceback" not in err and last.startswith("error:"), err
    assert "changed while its listings were embedded, 3 times" in last
    assert calls.n == index.EMBED_TRIES and not (art / "gallery").exists()


def test_two_adds_embedding_at_once_both_land(art, demo_data, tmp_path, calls):
    index.build(art, _listings(demo_data, tmp_path, "first"))
    both = threading.Barrier(2, timeout=60)       # before the fix the second waited on the first's lock
    calls.before = lambda n: both.wait()
    threads = [_in_thread(index.add, art, _listings(demo_data, tmp_path, f"b{b}", start=8 * b + 8))
               for b in range(2)]
    for t, _ in threads:
        t.join(180)
    assert all("error" not in box for _, box in threads), [box.get("error") for _, box in threads]
    gallery = index.Gallery.load(art)
    assert len(gallery) == 12 == len(gallery.listings)
    assert {f"b{b}_{i}" for b in range(2) for i in range(4)} <= set(gallery.listings["listing_id"])


# --- 12. checks before work ----------------------------------------------------------------------------

def test_index_add_of_clashing_ids_is_refused_before_embedding(art, demo_data, tmp_path, calls, capsys):
    index.build(art, _listings(demo_data, tmp_path, "first"))
    calls.n = 0
    before = {p.name: p.read_bytes() for p in (art / "gallery").iterdir()}
    csv = tmp_path / "again.csv"
    photos = sorted((tmp_path / "first").iterdir())
    pd.DataFrame({"listing_id": ["fresh", "first_2"], "image": photos[:2]}).to_csv(csv, index=False)
    code, _, err = run_cli("index", "add", art, csv, capsys=capsys)
    assert _one_line_error(code, err) and "'first_2' is already in the index" in err, err
    assert calls.n == 0                                            # not one photo embedded
    assert {p.name: p.read_bytes() for p in (art / "gallery").iterdir()} == before


def test_index_add_without_an_index_is_refused_before_embedding(art, demo_data, tmp_path, calls, capsys):
    code, _, err = run_cli("index", "add", art, _listings(demo_data, tmp_path, "new"), capsys=capsys)
    assert _one_line_error(code, err) and "has no index" in err and calls.n == 0


@pytest.fixture
def predicted(monkeypatch):
    """Counts photos the predictor is asked for, whichever command asks."""
    seen = []
    real = Predictor.__call__

    def counting(self, images, progress=None):
        seen.append(len(images))
        return real(self, images, progress)
    monkeypatch.setattr(Predictor, "__call__", counting)
    return seen


@pytest.mark.parametrize("case", ["ids", "column", "missing class"])
def test_a_sample_submission_that_does_not_fit_is_refused_before_predicting(case, tiny_artifact, demo_data,
                                                                             tmp_path, predicted, capsys):
    sample = pd.read_csv(demo_data.sample_submission, encoding="utf-8-sig", dtype={"ID": str})
    if case == "ids":
        sample.loc[0, "ID"] = "TEST_99999"
    elif case == "column":
        sample = sample.rename(columns={sample.columns[3]: "Nope_Car_2020_2020"})
    else:
        sample = sample.drop(columns=sample.columns[-1])
    bad = tmp_path / "sample.csv"
    sample.to_csv(bad, index=False, encoding="utf-8-sig")
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", demo_data.test_csv, "--sample-submission",
                           bad, "--out", tmp_path / "sub.csv", capsys=capsys)
    message = {"ids": "'TEST_99999' is only in the sample", "column": "'Nope_Car_2020_2020' is not a class",
               "missing class": "has no column"}[case]
    assert _one_line_error(code, err) and message in err, err
    assert predicted == [] and not (tmp_path / "sub.csv").exists()
    with pytest.raises(HierError, match=message.replace("'", ".")):          # the Python API checks first too
        Recognizer(tiny_artifact[0]).submission(demo_data.test_csv, bad, tmp_path / "sub.csv")
    assert predicted == [] and not (tmp_path / "sub.csv").exists()


def test_read_sample_then_write_matches_writing_from_the_path(tiny_artifact, demo_data, tmp_path):
    from hier.data import read_test_csv
    from hier.competitions.hecto import read_sample, write_submission
    tax = artifact.load(tiny_artifact[0])[1]
    ids = read_test_csv(demo_data.test_csv).ids
    probs = np.random.default_rng(0).dirichlet(np.ones(len(tax)), len(ids))
    checked = read_sample(demo_data.sample_submission, ids, tax)
    a = write_submission(probs, ids, tax, checked, tmp_path / "a.csv")
    b = write_submission(probs, ids, tax, demo_data.sample_submission, tmp_path / "b.csv")
    assert a.equals(b) and (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes()[:3] == b"\xef\xbb\xbf"          # the sample's BOM kept
    with pytest.raises(HierError, match="IDs do not match"):
        read_sample(demo_data.sample_submission, ids[1:], tax)
