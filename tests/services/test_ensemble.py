"""``hier ensemble``: folds and recipes of tiny artifacts combined, served like one artifact, refusals."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY, rename_classes, run_cli
from scipy.special import log_softmax

from hier import artifact
from hier.artifact.files import ENSEMBLE, OOF
from hier.artifact.records import read_oof
from hier.errors import HierError
from hier.export.auto import artifact_predictor
from hier.metrics import fit_temperature, softmax
from hier.models import ModelConfig
from hier.recognizer import Recognizer
from hier.services.ensemble.build import build
from hier.taxonomy import Taxonomy
from hier.training.config import TrainConfig
from hier.training.run import train


def tiny(demo_data, out, **train_flags):
    """test_efficientnet at 64 px, 2 epochs: seconds on 2 idle cores."""
    cfg = dict(epochs=2, batch_size=16, lr=3e-3, head_lr=1e-2, pretrained="none", ema=False, export=False)
    train(demo_data.train_dir, out, Taxonomy.from_csv(demo_data.taxonomy), ModelConfig(**vars(TINY)),
          TrainConfig(**{**cfg, **train_flags}))
    return out


@pytest.fixture(scope="module")
def folds(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [tiny(demo_data, root / f"fold{i}", fold=i, folds=3) for i in range(3)]


@pytest.fixture(scope="module")
def recipes(demo_data, tmp_path_factory):
    """Two recipes on one split (seed 0, 20 % validation): their OOF photos are the same."""
    root = tmp_path_factory.mktemp("recipes")
    return [tiny(demo_data, root / "a"), tiny(demo_data, root / "b", lr=1e-3, head_lr=3e-3, seed=0)]


def test_folds_ensemble_serves_like_an_artifact(folds, demo_data, tmp_path, capsys):
    members = [tmp_path / f"m{i}" for i in range(3)]
    for src, dst in zip(folds, members):
        shutil.copytree(src, dst)
    out = tmp_path / "E"
    code, stdout, err = run_cli("ensemble", *members, "--out", out, capsys=capsys)
    assert code == 0, err
    assert "ensemble" in stdout and "log loss" in stdout
    spec = json.loads((out / ENSEMBLE).read_text())
    assert [m["weight"] for m in spec["members"]] == pytest.approx([1 / 3] * 3)
    assert [m["fold"] for m in spec["members"]] == [0, 1, 2] and {m["group"] for m in spec["members"]} == {0}
    assert "fold-average" in spec["fitted"]
    # the temperature is refitted on the concatenated OOF scores, each photo by its own fold member
    oofs = [read_oof(f / OOF) for f in folds]
    temps = [artifact.read_config(f)["model"]["temperature"] for f in folds]
    joint = np.concatenate([log_softmax(o["logits"].astype(np.float64) / t, axis=1) for o, t in zip(oofs, temps)])
    y = np.concatenate([o["labels"] for o in oofs])
    assert spec["oof"]["images"] == len(y) == len(list(demo_data.train_dir.glob("*/*.jpg")))
    assert spec["temperature"] == pytest.approx(fit_temperature(joint, y))
    for m in members:                               # E holds its own copies
        shutil.rmtree(m)

    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::7]
    rec = Recognizer(out)
    probs = rec.predict_proba(photos)
    # by hand, from the members' own predictors (each its img_size, TTA, backend) and temperatures
    hand = 0
    for m in spec["members"]:
        net, _ = artifact.load(out / m["dir"])
        member = artifact_predictor(out / m["dir"], net)(photos)["joint"].astype(np.float64)
        hand = hand + m["weight"] * log_softmax(member / net.cfg.temperature, axis=1)
    np.testing.assert_allclose(probs, softmax(hand, spec["temperature"]), atol=1e-6)
    results = rec.predict(photos, topk=3)
    tax = rec.taxonomy
    for r, p in zip(results, probs):
        brand = tax.brands.index(r.brand)
        assert r.p_brand == pytest.approx(p[tax.fine_to_brand == brand].sum(), abs=1e-6)
        assert r.p <= r.p_model <= r.p_brand + 1e-9

    code, stdout, err = run_cli("predict", out, photos[0], "--format", "json", capsys=capsys)
    assert code == 0, err
    assert json.loads(stdout)[0]["p"] == pytest.approx(float(probs[0].max()), abs=1e-5)
    code, stdout, err = run_cli("evaluate", out, demo_data.train_dir, "--json", capsys=capsys)
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["temperature"] == pytest.approx(spec["temperature"]) and 0 <= metrics["top1"] <= 1
    table = rec.submission(demo_data.test_csv, demo_data.sample_submission, tmp_path / "sub.csv")
    assert np.allclose(table.iloc[:, 1:].sum(1), 1)


def test_fitted_weights_beat_equal_weights(recipes, tmp_path):
    spec = build(recipes, tmp_path / "E")
    oofs = [read_oof(r / OOF) for r in recipes]
    assert list(oofs[0]["paths"]) == list(oofs[1]["paths"])          # one split, two recipes
    temps = [artifact.read_config(r)["model"]["temperature"] for r in recipes]
    s = [log_softmax(o["logits"].astype(np.float64) / t, axis=1) for o, t in zip(oofs, temps)]
    y = oofs[0]["labels"]

    def loss(w):
        joint = w[0] * s[0] + w[1] * s[1]
        t = fit_temperature(joint, y)
        return -log_softmax(joint / t, axis=1)[np.arange(len(y)), y].mean()
    w = [m["weight"] for m in spec["members"]]
    assert sum(w) == pytest.approx(1) and min(w) >= 0
    assert spec["oof"]["log_loss"] == pytest.approx(loss(w), abs=1e-6)
    assert spec["oof"]["equal_weights_log_loss"] == pytest.approx(loss([0.5, 0.5]), abs=1e-6)
    assert spec["oof"]["log_loss"] <= loss([0.5, 0.5]) + 1e-9
    assert spec["oof"]["log_loss"] <= min(m["oof"]["log_loss"] for m in spec["members"]) + 1e-6
    given = build(recipes, tmp_path / "given", "1,3")
    assert [m["weight"] for m in given["members"]] == pytest.approx([0.25, 0.75])
    assert given["oof"]["log_loss"] == pytest.approx(loss([0.25, 0.75]), abs=1e-6)


def test_oof_photos_match_across_copies_of_the_data(recipes, demo_data, tmp_path):
    """A recipe trained on a copy of the data (another machine's mount) scores the same photos: oof.npz
    names them relative to the training folder, so weights are fitted on all of them."""
    copy = tmp_path / "elsewhere" / "train"
    shutil.copytree(demo_data.train_dir, copy)
    other = tiny(SimpleNamespace(train_dir=copy, taxonomy=demo_data.taxonomy), tmp_path / "b", lr=1e-3, head_lr=3e-3)
    a, b = (read_oof(r / OOF) for r in (recipes[0], other))
    assert sorted(a["paths"]) == sorted(b["paths"]) and not str(a["paths"][0]).startswith("/")
    spec = build([recipes[0], other], tmp_path / "E")
    assert spec["oof"]["images"] == len(a["paths"]) and "fitted" in spec["fitted"]


def test_oof_names_linked_photos_below_the_data_folder(tmp_path):
    """A split made of symlinks (bench_ensemble's) names its photos below its own folder, not where the
    links point; a photo outside DATA keeps its path as given."""
    from hier.artifact.records import save_oof
    real = tmp_path / "shared" / "Audi" / "1.jpg"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"x")
    link = tmp_path / "split" / "train" / "Audi" / "1.jpg"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    other = tmp_path / "elsewhere.jpg"
    save_oof(tmp_path / "oof.npz", [link, other], np.array([0, 0]), np.zeros((2, 1)), ["Audi"],
             tmp_path / "split" / "." / "train")
    assert list(read_oof(tmp_path / "oof.npz")["paths"]) == ["Audi/1.jpg", str(other)]


def test_mixed_groups_fit_between_recipes(folds, recipes, tmp_path):
    """Three folds (one recipe, whole-data OOF) + one single model: weights fitted between the two groups
    on the single model's validation photos; the folds share theirs equally."""
    spec = build([*folds, recipes[0]], tmp_path / "E")
    groups = [m["group"] for m in spec["members"]]
    assert groups[:3] == [0, 0, 0] and groups[3] == 1
    w = [m["weight"] for m in spec["members"]]
    assert w[0] == pytest.approx(w[1]) == pytest.approx(w[2]) and sum(w) == pytest.approx(1)
    assert spec["oof"]["images"] == len(read_oof(recipes[0] / OOF)["labels"])


@pytest.mark.parametrize("case", ["taxonomy", "not_artifact", "ensemble", "out_not_empty", "one", "count",
                                  "negative"])
def test_refusals(case, folds, tmp_path, capsys):
    members, flags = list(folds[:2]), []
    if case == "taxonomy":
        other = tmp_path / "renamed"
        shutil.copytree(folds[2], other)
        first = Taxonomy.from_csv(other / "taxonomy.csv").classes[1]
        rename_classes(other, {first: first + " X"})
        members.append(other)
        expect = "taxonomy differs"
    elif case == "not_artifact":
        (tmp_path / "empty").mkdir()
        members.append(tmp_path / "empty")
        expect = "is not a hier artifact"
    elif case == "ensemble":
        build(folds[:2], tmp_path / "E1")
        members.append(tmp_path / "E1")
        expect = "is an ensemble"
    elif case == "out_not_empty":
        (tmp_path / "E").mkdir()
        (tmp_path / "E" / "x").write_text("keep")
        expect = "not empty"
    elif case == "one":
        members = members[:1]
        expect = "at least 2"
    else:
        flags = ["--weights", "1,2,3" if case == "count" else "1,-1"]
        expect = "3 weight(s) for 2" if case == "count" else "--weights"
    code, _, err = run_cli("ensemble", *members, "--out", tmp_path / "E", *flags, capsys=capsys)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    if case != "out_not_empty":
        assert not (tmp_path / "E").exists()
    else:
        assert (tmp_path / "E" / "x").read_text() == "keep"


def test_ensemble_refuses_edits_and_search(folds, demo_data, tmp_path, capsys):
    out = tmp_path / "E"
    build(folds, out, "equal")
    rec = Recognizer(out)
    photo = sorted(demo_data.train_dir.glob("*/*.jpg"))[0]
    for call in (lambda: rec.enroll("new_2025", [photo]), lambda: rec.similar(photo), lambda: rec.export(),
                 lambda: rec.explain([photo], tmp_path / "cam"), lambda: rec.index(demo_data.train_dir),
                 lambda: rec.embed([photo])):
        with pytest.raises(HierError, match="is an ensemble.*member artifact"):
            call()
    for args, expect in ((["enroll", out, "--class", "new_2025", "--images", photo], "member artifact"),
                         (["export", out], "member artifact"),
                         (["predict", out, photo, "--explain", tmp_path / "cams"], "member artifact"),
                         (["embed", out, demo_data.train_dir, "--out", tmp_path / "emb"], "one of its members"),
                         (["index", "drop", out, "old"], "member artifact"),
                         (["index", "merge", out, "a", "b", "--into", "c"], "member artifact")):
        code, stdout, err = run_cli(*args, capsys=capsys)      # refused before any answer is printed
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1 and not stdout.strip(), err
    assert not (tmp_path / "cams").exists() and not (tmp_path / "emb").exists()


def test_ensemble_keeps_its_version_when_a_member_changes(folds, demo_data, tmp_path):
    """E's members are hard links of files that hier only ever replaces by renames: enrolling a class into
    a member (or retraining it) after the build leaves E's answers and files as they were."""
    members = [tmp_path / f"m{i}" for i in range(2)]
    for src, dst in zip(folds, members):
        shutil.copytree(src, dst)
    out = tmp_path / "E"
    build(members, out)
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::9]
    before = Recognizer(out).predict_proba(photos)
    files = {f: f.read_bytes() for f in out.rglob("*") if f.is_file() and f.name != ".hier.lock"}
    Recognizer(members[0]).enroll("new_2025", photos[:3], brand="New", model="Car", max_base_drop=1.0)
    assert "new_2025" in Taxonomy.from_csv(members[0] / "taxonomy.csv").classes
    assert {f: f.read_bytes() for f in files} == files
    np.testing.assert_array_equal(Recognizer(out).predict_proba(photos), before)


def test_serve_answers_with_an_ensemble(folds, demo_data, tmp_path):
    from fastapi.testclient import TestClient

    from hier.serve import create_app

    out = tmp_path / "E"
    build(folds, out)
    photo = sorted(demo_data.train_dir.glob("*/*.jpg"))[0]
    expected = Recognizer(out).predict([photo])[0]
    with TestClient(create_app(out)) as client:
        answer = client.post("/predict", files={"file": ("car.jpg", photo.read_bytes(), "image/jpeg")}).json()
        assert client.get("/health/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
    assert answer["fine"] == expected.fine
