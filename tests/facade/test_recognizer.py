"""The Python API (``Recognizer``) and the one prediction path behind every command."""
import inspect
import json
import shutil
import threading
import time

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, run_cli
from PIL import Image

from hier import HierError, Recognizer, artifact, fileio
from hier.artifact.files import STATISTICS
from hier.errors import HierWarning
from hier.models.statistics import ClassStatistics
from hier.services.labelling import SEARCH_SHRINK


@pytest.fixture
def art(art):
    """The copy of the tiny artifact, serving with flip TTA as the `cpu` preset does."""
    config = artifact.read_config(art)
    config["model"]["tta"] = True
    (art / artifact.CONFIG).write_text(json.dumps(config))
    return art


def _photos(demo_data, cls="Cinder_Rook_2019_2023", n=4):
    return sorted((demo_data.train_dir / cls).glob("*.jpg"))[:n]


def test_predict_takes_paths_pil_and_arrays(art, demo_data):
    path = _photos(demo_data)[0]
    rec = Recognizer(art)
    preds = rec.predict([path, Image.open(path), np.asarray(Image.open(path).convert("RGB"))], topk=3)
    assert len(preds) == 3 and [p.image for p in preds][1:] == ["<image 1>", "<image 2>"]
    assert preds[0].p == pytest.approx(preds[1].p, abs=1e-6) == pytest.approx(preds[2].p, abs=1e-6)
    tax = rec.taxonomy
    for p in preds:
        row = tax.row(p.fine)
        assert (row["brand"], row["model"]) == (p.brand, p.model) and p.years == tax.years(p.fine)
        assert p.p <= p.p_model + 1e-9 <= p.p_brand + 2e-9 and len(p.topk) == 3
    frame = preds.to_frame()
    assert len(frame) == 9 and list(frame.columns[:3]) == ["image", "rank", "class"]
    assert json.loads(preds.to_json())[0]["fine"] == preds[0].fine
    with pytest.raises(HierError, match="not an image"):
        rec.predict([path, np.zeros((4, 4, 2), dtype=np.uint8)])     # float arrays are scaled now (#15.8)


def test_results_carry_the_distribution_and_one_schema(art, demo_data, tmp_path):
    """The whole (N, C) distribution, in ``classes`` order, behind every view: each prediction's
    ``probs`` row, ``predict_proba`` (scikit-learn's convention, ``classes_``), the top-k rows, the CSV."""
    rec = Recognizer(art)
    photos = _photos(demo_data, n=3)
    preds = rec.predict(photos, topk=4)
    proba = rec.predict_proba(photos)
    assert proba.shape == (3, 12) and preds.classes == rec.classes_ == rec.taxonomy.classes
    np.testing.assert_allclose(preds.probs, proba, atol=1e-6)
    for p, row in zip(preds, proba):
        np.testing.assert_allclose(p.probs, row, atol=1e-6)
        assert [r["class"] for r in p.topk] == [rec.classes_[i] for i in np.argsort(-row, kind="stable")[:4]]
        assert p.p == pytest.approx(row[rec.classes_.index(p.fine)], abs=1e-6)
    assert preds.speed["photos"] == 3 and preds.speed["ms_per_photo"] > 0
    preds.to_csv(tmp_path / "answers.csv")
    back = pd.read_csv(tmp_path / "answers.csv")
    assert list(back.columns) == list(preds.to_frame().columns) and len(back) == 12
    assert "probs" not in json.loads(preds.to_json())[0]
    frame = preds.to_frame()                        # every row carries its photo's answer (top-down)
    assert list(frame["answer"]) == [p.fine for p in preds for _ in range(4)]
    assert list(frame["answer_brand"]) == [p.brand for p in preds for _ in range(4)]


def test_every_command_computes_the_same_embedding_and_probability(art, demo_data, tmp_path, capsys):
    """Before, enroll/index/similar embedded without the TTA the artifact serves and was calibrated
    with; now one predictor computes every embedding and probability."""
    photos = _photos(demo_data, n=3)
    rec = Recognizer(art)
    assert rec.predictor.tta
    ref = rec.embed(photos)
    # probabilities: the API, `hier predict --format json` and a submission
    code, out, _ = run_cli("predict", art, *photos, "--topk", "1", "--format", "json", capsys=capsys)
    cli_p = {r["image"]: r["p"] for r in json.loads(out)}
    top = ref["probs"].argmax(1)
    assert code == 0 and np.allclose([cli_p[str(p)] for p in photos], ref["probs"][np.arange(3), top], atol=1e-6)
    test_csv, sample = tmp_path / "test.csv", tmp_path / "sample.csv"
    pd.DataFrame({"ID": ["a", "b", "c"], "img_path": [str(p) for p in photos]}).to_csv(test_csv, index=False)
    pd.DataFrame(0.0, index=["a", "b", "c"], columns=rec.taxonomy.classes).rename_axis("ID").reset_index() \
        .to_csv(sample, index=False)
    assert run_cli("predict", art, "--test-csv", test_csv, "--sample-submission", sample, "--out",
                   tmp_path / "sub.csv", capsys=capsys)[0] == 0
    sub = pd.read_csv(tmp_path / "sub.csv").set_index("ID")[rec.taxonomy.classes].to_numpy()
    assert np.abs(sub - ref["probs"]).max() < 1e-4        # the submission floor moves tiny values only
    # embeddings: enroll (the stored shot sum of one photo), the index, and similar's query
    code, _, err = run_cli("enroll", art, "--class", "Zephyr_Gale_2025_2025", "--brand", "Zephyr", "--images",
                           photos[0], capsys=capsys)
    assert code == 0, err
    stats = ClassStatistics.load(art / STATISTICS)
    np.testing.assert_allclose(stats.shot_sums[stats.index["Zephyr_Gale_2025_2025"]], ref["embedding"][0], atol=1e-5)
    listings = tmp_path / "listings"
    listings.mkdir()
    for i, p in enumerate(photos):
        shutil.copy(p, listings / f"L{i}.jpg")
    assert run_cli("index", "build", art, listings, capsys=capsys)[0] == 0
    index = faiss.read_index(str(art / "gallery" / "index.faiss"))       # whitened by the artifact's statistics
    stored = np.stack([faiss.downcast_index(index.index).reconstruct(i) for i in range(3)])
    whitened = ref["embedding"] @ rec.net.statistics.whitening(SEARCH_SHRINK)
    np.testing.assert_allclose(stored, whitened / np.linalg.norm(whitened, axis=1, keepdims=True), atol=1e-5)
    rows = rec.similar(photos[1], k=3)
    assert rows["listing_id"][0] == "L1" and rows["hier_similarity"][0] == pytest.approx(1.0, abs=1e-5)


def test_a_long_lived_recognizer_sees_enrollments_made_elsewhere(art, demo_data, capsys):
    rec = Recognizer(art)
    assert len(rec.predict(_photos(demo_data)[:1], topk=20)[0].topk) == 12
    code, _, err = run_cli("enroll", art, "--class", "Zephyr_Gale_2025_2025", "--brand", "Zephyr", "--images",
                           demo_data.train_dir / "Cinder_Rook_2019_2023", capsys=capsys)   # another "process"
    assert code == 0, err
    answer = rec.predict(_photos(demo_data)[:1], topk=20)[0]
    assert len(answer.topk) == 13 and "Zephyr_Gale_2025_2025" in {r["class"] for r in answer.topk}
    rec.unenroll("Zephyr_Gale_2025_2025")                  # through the API: the next answer sees it too
    assert len(rec.taxonomy) == 12


def test_evaluate_matches_the_cli(art, demo_data, capsys):
    metrics = Recognizer(art).evaluate(demo_data.train_dir)
    code, out, _ = run_cli("evaluate", art, demo_data.train_dir, "--json", capsys=capsys)
    cli = json.loads(out)
    assert code == 0 and metrics["images"] == cli["images"] == 144
    assert metrics["log_loss"] == pytest.approx(cli["log_loss"], abs=1e-9) and metrics["top1"] == cli["top1"]


def test_train_through_the_api(demo_data, tmp_path):
    rec = Recognizer.train(demo_data.train_dir, tmp_path / "run", taxonomy=demo_data.taxonomy, trunk=TINY.trunk,
                           img_size=64, embed_dim=32, pretrained="none", epochs=1, batch_size=32, val_frac=0.25)
    assert len(rec.taxonomy) == 12 and rec.metrics["images"] == 36 and rec.net.cfg.img_size == 64
    with pytest.raises(HierError, match="differs from the saved"):
        Recognizer.train(demo_data.train_dir, tmp_path / "run", resume=True, epochs=2, batch_size=8)
    rec = Recognizer.train(demo_data.train_dir, tmp_path / "run", resume=True, epochs=2, batch_size=32)
    assert len(pd.read_csv(rec.path / "log.csv")) == 2
    with pytest.raises(HierError, match=r"unknown training setting\(s\): 'epoch'"):
        Recognizer.train(demo_data.train_dir, tmp_path / "other", epoch=3)
    with pytest.raises(HierError, match="not a hier artifact"):
        Recognizer(tmp_path)


def test_onnx_export_serves_the_same_answers(art, demo_data, capsys):
    photos = _photos(demo_data, n=4)
    eager = Recognizer(art, backend="torch").embed(photos)
    code, out, err = run_cli("export", art, capsys=capsys)
    assert code == 0 and (art / "model.onnx").is_file(), err
    rec = Recognizer(art)
    assert rec.predictor.session is not None and rec.predictor.views == 1 and rec.predictor.tta   # mirrors: more photos
    fast = rec.embed(photos)
    for k, tolerance in (("embedding", 1e-4), ("joint", 1e-3), ("probs", 1e-4)):    # LDA scores run to ~20
        np.testing.assert_allclose(fast[k], eager[k], atol=tolerance)
    # enrolling changes the heads only: the export stays in use and answers with the new class
    assert rec.enroll("Zephyr_Gale_2025_2025", _photos(demo_data, n=3), brand="Zephyr").classes == 13
    assert rec.predictor.session is not None and rec.embed(photos)["probs"].shape == (4, 13)
    # retrained weights make the export stale: refused when asked for, exported again by auto on first use
    net, tax = artifact.load(art)
    with torch.no_grad():
        net.trunk.conv_stem.weight.mul_(1.5)
    artifact.save(art, net, tax)
    with pytest.raises(HierError, match="no up-to-date ONNX export"):
        Recognizer(art, backend="onnx").predictor
    retrained = Recognizer(art, backend="torch").embed(photos)["embedding"]
    rec = Recognizer(art)
    assert rec.predictor.session is not None
    assert artifact.read_config(art)["onnx"]["fingerprint"] == net.fingerprint()
    np.testing.assert_allclose(rec.embed(photos)["embedding"], retrained, atol=1e-4)
    assert np.abs(retrained - eager["embedding"]).max() > 1e-2          # the weights did change
    # an export that cannot be written (here a folder in its place) answers on eager PyTorch, one warning
    (art / "model.onnx").unlink()
    (art / "model.onnx").mkdir()
    with pytest.warns(HierWarning, match="could not write its ONNX export"):
        assert Recognizer(art).predictor.session is None


def test_a_photo_given_twice_gets_its_own_rows_once(art, demo_data):
    """Rows were picked by the photo's name: each copy of a file given twice (here beside an array, so
    the copies are kept) got both copies' rows."""
    a, b = _photos(demo_data, n=2)
    preds = Recognizer(art).predict([a, np.asarray(Image.open(b).convert("RGB")), a], topk=3)
    assert [p.image for p in preds] == [str(a), "<image 1>", str(a)]
    assert [len(p.topk) for p in preds] == [3, 3, 3]
    assert [r["class"] for r in preds[0].topk] == [r["class"] for r in preds[2].topk]
    assert [r["rank"] for r in preds[0].topk] == [1, 2, 3]        # (p equal to float noise: batch positions)
    assert preds[0].fine == preds[2].fine and preds[0].p == pytest.approx(preds[2].p, abs=1e-5)
    assert len(preds.to_frame()) == 9


def test_the_gallery_is_held_in_memory_until_its_files_change(art, demo_data, monkeypatch):
    rec = Recognizer(art)
    rec.index(demo_data.train_dir / "Cinder_Rook_2019_2023")
    reads = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a: (reads.append(a), real(*a))[1])
    photo = _photos(demo_data)[0]
    for _ in range(3):
        assert rec.similar(photo, k=2)["listing_id"][0] == photo.stem
    assert len(reads) == 1 and rec.listing_photo(photo.stem) == str(photo)
    rec.index(demo_data.train_dir / "Borealis_Lynx_2019_2022")          # rebuilt: read again
    # read again (the index file itself once more; the trained empty index kept for new shards is read too)
    assert rec.listing_photo(photo.stem) is None and [str(r[0]).endswith("index.faiss") for r in reads].count(True) == 2


def test_a_writer_holding_the_lock_does_not_stall_a_loaded_recognizer(art, demo_data):
    """Once loaded, a recognizer answers with the version it holds while another thread (or process)
    holds the artifact's lock, and reads the new version after it is released."""
    rec = Recognizer(art)
    photo = _photos(demo_data)[0]
    before = rec.predict(photo)[0]
    held, release = threading.Event(), threading.Event()

    def writer():
        with fileio.locked(art):
            config = artifact.read_config(art)
            fileio.atomic_write(art / artifact.CONFIG, lambda p: p.write_text(json.dumps(config)))
            held.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert held.wait(30)
        start = time.perf_counter()
        assert rec.predict(photo)[0] == before and rec.stale                 # the version in memory
        assert time.perf_counter() - start < 5
    finally:
        release.set()
        t.join(30)
    old = rec.loaded
    assert rec.predict(photo)[0] == before and rec.loaded is not old and not rec.stale


def test_answers_do_not_depend_on_the_batch_size(art, demo_data):
    """The statistical head's scores run to ~1e5; summed in float32, 2 of 48 answers changed between
    batches of 1 and 64 on a tiny model (hostile review). Computed in float64 and shifted per row."""
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::3]
    one, many = Recognizer(art, batch_size=1).predict(photos), Recognizer(art, batch_size=64).predict(photos)
    assert [p.fine for p in one] == [p.fine for p in many]
    np.testing.assert_allclose(one.probs, many.probs, atol=1e-5)


def test_one_rule_refuses_what_a_kind_cannot_do_for_every_public_method(tmp_path):
    """Every public method of ``Recognizer`` declares the capability it needs (``hier.folders``), and a
    folder whose kind lacks it refuses the call in one line, before any work. An ensemble's hand-kept list
    of refused methods once missed ``index_drop`` and ``index_merge``, which then said "has no index; run
    `hier index build E LISTINGS` first", a command ensembles refuse."""
    from hier.folders import CAPABILITIES, FOLDER_KINDS
    holding = {"check_supports", "reload", "snapshot"}      # about the copy in memory, not the folder
    public = {n for n in dir(Recognizer) if not n.startswith("_") and            # its mixin's methods too
              inspect.isfunction(inspect.getattr_static(Recognizer, n))}
    declared = {n: getattr(Recognizer, n).capability for n in public - holding}
    assert set(declared.values()) <= set(CAPABILITIES)
    for name in ("ensemble.json", "config.json", "taxonomy.csv"):     # an ensemble folder, as folder_kind sees it
        (tmp_path / name).write_text("{}")
    rec = Recognizer(tmp_path)
    refused = {n for n, c in declared.items() if c not in FOLDER_KINDS["ensemble"].capabilities}
    assert {"index_drop", "index_merge", "index_add", "similar", "enroll", "embed_shard", "export"} <= refused
    assert {"predict", "predict_proba", "evaluate", "submission", "report"}.isdisjoint(refused)
    for name in sorted(refused):
        with pytest.raises(HierError, match="is an ensemble.*member artifact"):
            rec.check_supports(name)
        with pytest.raises(HierError, match="is an ensemble.*member artifact"):
            getattr(rec, name)("any", "arguments")            # refused before they are looked at
