"""Few-shot enrollment (`hier enroll`, `unenroll`) on a copy of the tiny trained artifact: a new class is
appended without changing old answers and within its base-drop budget, enrolled again adds shots, unenroll
restores the artifact exactly (statistical and trained heads); enrolling rewrites the heads, not the trunk,
and reports the share of its shots that `predict` answers as it. Then the defects of issues 7 and 15:
add-shots to a base class, what enrollment counts and says (copies of a photo, near-duplicates, demo
names), and a class named in NFD."""
import json
import shutil
import unicodedata

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    enroll_shots,
    files_and_modes,
    image_flags,
    one_error_line_after_warnings,
    photos_of,
    rename_classes,
    run_cli,
)
from PIL import Image

from hier import artifact, enrollment, fileio
from hier.artifact.files import STATISTICS
from hier.artifact.records import read_validation
from hier.enrollment.offsets import MAX_RAISE
from hier.models.statistics import ClassStatistics
from hier.recognizer import Recognizer
from hier.runtime import Predictor

NEW = "Zephyr_Gale_2025_2025"


def test_enroll_appends_and_never_changes_old_answers(art, demo_data, capsys):
    before, tax0 = artifact.load(art)
    paths = sorted(demo_data.train_dir.glob("*/*.jpg"))
    old = Predictor(before)(paths)["joint"].argmax(1)
    code, _, err = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", "--model", "Gale")
    assert code == 0, err
    after, tax = artifact.load(art)
    assert (len(tax), len(tax.models), len(tax.brands)) == (13, 7, 4)
    assert tax.row(NEW)["brand"] == "Zephyr" and tax.years(NEW) == "2025"
    torch.testing.assert_close(after.fine.weight[:12], before.fine.weight)         # base rows untouched
    new = Predictor(after)(paths)["joint"].argmax(1)
    assert np.all((new == old) | (new == tax.class_index[NEW]))                  # only the new class takes images
    # the new class is likelier on photos of the look it was enrolled from than on the other photos
    score = np.log(Predictor(after)(paths)["probs"][:, tax.class_index[NEW]])
    src = np.array([p.parent.name == "Cinder_Rook_2019_2023" for p in paths])
    assert score[src].mean() > score[~src].mean() + 1.0          # measured (seeded): -3.24 vs -5.21
    # predict includes the enrolled class with no other change
    code, out, _ = run_cli("predict", art, *photos_of(demo_data, "Cinder_Rook_2019_2023", 2), "--topk", "13",
                           "--format", "json", capsys=capsys)
    assert code == 0 and NEW in {r["class"] for r in json.loads(out)}


@pytest.mark.parametrize("head", ["statistics", "trained"])
def test_a_new_class_costs_at_most_its_base_drop_budget(head, request, demo_data, capsys):
    """Shots of a base class enrolled under a new name (a perfect look-alike, the hardest case): at
    --max-base-drop 0 it takes none of the held-out base photos answered right before; at 100 it gets
    no offset (the trained head) or the largest raise (the statistical head) and takes some; at 4 an
    offset in between."""
    art = request.getfixturevalue("art" if head == "statistics" else "legacy_art")
    z, y = read_validation(art)
    net, _ = artifact.load(art)
    right = net.heads(z)["joint"].argmax(1) == y
    lost = {}
    for budget in ("0", "4", "100"):
        code, out, err = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", "--max-base-drop", budget)
        assert code == 0 and "of the known classes' held-out photos" in out.lower(), err
        net, tax = artifact.load(art)
        answers = net.heads(z)["joint"].argmax(1)
        lost[budget] = (int((right & (answers != y)).sum()), artifact.read_config(art)["enrolled"][0]["offset"])
        assert run_cli("unenroll", art, "--class", NEW, capsys=capsys)[0] == 0
    most = -MAX_RAISE if head == "statistics" else 0.0
    assert lost["0"][0] == 0 and lost["100"] == (lost["100"][0], most) and lost["100"][0] > 0
    # 4%: an expected loss (on photos like these, not on these), so within a photo of 4% of the 29;
    # measured (seeded): offsets 0.67 / 0.27 / 0, photos lost 0 / 0 / 3 (trained head)
    assert lost["4"][0] <= 0.04 * len(y) + 1 and lost["0"][1] > lost["4"][1] > lost["100"][1]
    (art / "validation.npz").unlink()                        # an artifact trained before validation.npz
    code, out, err = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr")
    assert code == 0 and "no validation.npz" in err and "held-out photos" not in out
    code, _, err = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", "--max-base-drop", "-1", name="Other_2025")
    assert code == 2 and "--max-base-drop" in err


def test_re_enroll_adds_shots_and_unenroll_restores(art, demo_data, capsys):
    original = artifact.load(art)[0]
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))
    answers = Predictor(original)(photos)["probs"]
    code, out, _ = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", n=3)
    assert code == 0 and f"enrolled '{NEW}' from 3 shot(s)" in out
    code, out, _ = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", n=5)       # the first 3 again, 2 more
    # before: "enrolled ... from 5 shot(s)" and 8 shots, the first three counted twice
    assert code == 0 and f"added 2 shot(s) to '{NEW}' (5 in all); 3 duplicate photo(s) dropped" in out, out
    [entry] = artifact.read_config(art)["enrolled"]
    assert (entry["class"], entry["shots"]) == (NEW, 5)
    stats = ClassStatistics.load(art / STATISTICS)
    assert stats.shot_counts[stats.index[NEW]] == 5 and stats.counts[stats.index[NEW]] == 0
    code, _, err = run_cli("unenroll", art, "--class", NEW, capsys=capsys)
    assert code == 0, err
    net, tax = artifact.load(art)
    assert len(tax) == 12 and len(tax.brands) == 3 and NEW not in ClassStatistics.load(art / STATISTICS).index
    torch.testing.assert_close(net.fine.weight, original.fine.weight)
    np.testing.assert_allclose(Predictor(net)(photos)["probs"], answers, atol=1e-6)     # answers as before


def test_legacy_re_enroll_adds_shots_and_unenroll_restores(legacy_art, demo_data, capsys):
    art = legacy_art
    original = artifact.load(art)[0].fine.weight.detach().clone()
    assert enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", n=3)[0] == 0
    code, out, _ = enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", n=5)
    assert code == 0 and f"added 2 shot(s) to '{NEW}' (5 in all); 3 duplicate photo(s) dropped" in out, out
    [entry] = artifact.read_config(art)["enrolled"]
    assert (entry["class"], entry["shots"]) == (NEW, 5) and entry["offset"] >= 0       # re-fitted to the new row
    assert np.load(art / "enrolled.npy").shape == (1, 32)
    assert run_cli("unenroll", art, "--class", NEW, capsys=capsys)[0] == 0
    net, tax = artifact.load(art)
    assert len(tax) == 12 and not (art / "enrolled.npy").exists()
    torch.testing.assert_close(net.fine.weight, original)


def test_enrolling_rewrites_the_heads_not_the_trunk_and_rows_follow_their_names(art, demo_data, capsys):
    """Before: every enroll rewrote the whole model.safetensors (350 MB for a ConvNeXt-Base), and the
    head rows were matched to taxonomy.csv by position. Now the trunk file is left as it is, and a
    taxonomy.csv whose rows are reordered still gives each class its own row."""
    trunk = art / artifact.WEIGHTS
    stamp, data = fileio.file_stamp(trunk), trunk.read_bytes()
    assert not any(k.startswith(artifact.HEAD_PARTS) for k in safetensors_keys(trunk))
    assert enroll_shots(art, demo_data, capsys, "--brand", "Zephyr", "--model", "Gale")[0] == 0
    assert fileio.file_stamp(trunk) == stamp and trunk.read_bytes() == data
    assert (art / artifact.HEADS).stat().st_size < trunk.stat().st_size
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[::5]
    rec = Recognizer(art)
    before = rec.predict(photos)
    before_order = rec.taxonomy.classes
    table = pd.read_csv(art / artifact.TAXONOMY, dtype=str, keep_default_na=False)
    table.iloc[::-1].to_csv(art / artifact.TAXONOMY, index=False)          # classes, models, brands reordered
    assert Recognizer(art).taxonomy.classes[0] == before_order[-1]
    after = Recognizer(art).predict(photos)
    # the same class for every photo; the same score up to summation order (rows are permuted, so BLAS
    # and the softmax add in another order: a last-digit difference, not a different row)
    assert [p.fine for p in after] == [p.fine for p in before]
    assert np.allclose([p.p for p in after], [p.p for p in before], rtol=0, atol=1e-5)


def safetensors_keys(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("temperature", [None, 30.0])
def test_enroll_reports_the_share_of_its_shots_that_predict_answers_as_it(temperature, art, demo_data):
    """``own_shots_answered`` is what ``predict`` answers on those very shots: one answer function with the
    served temperature (the top-down answer sums a brand's probabilities, so it depends on it). Enrollment
    once answered its shots without the temperature: 1.0 reported where ``predict`` answered 0.8 of them
    (the third class below, at the tiny artifact's own temperature). ``temperature``: the artifact's own,
    or one as large as a whole-trunk run's."""
    if temperature is not None:
        config = artifact.read_config(art)
        config["model"]["temperature"] = temperature
        (art / artifact.CONFIG).write_text(json.dumps(config))
    rec = Recognizer(art, backend="torch")
    reported, answered = [], []
    for cls in ("Cinder_Rook_2019_2023", "Aurora_Nova_2015_2018", "Borealis_Lynx_2016_2018"):
        name = "Zephyr_Z" + cls.split("_")[1] + "_2030_2031"        # a new brand's models, from known looks
        shots = photos_of(demo_data, cls, 5)
        reported.append(rec.enroll(name, shots, brand="Zephyr").own_shots_answered)
        answered.append(float(np.mean([p.fine == name for p in rec.predict(shots)])))
    np.testing.assert_allclose(reported, answered)


# --- add-shots (issue 7, item 1) ------------------------------------------------------------------------

def test_add_shots_to_a_base_class(art, demo_data, capsys):
    code, _, err = enroll_shots(art, demo_data, capsys, "--add-shots", name="Aurora_Nova_2015_2018")
    assert code == 0, err
    assert len(artifact.load(art)[1]) == 12


@pytest.mark.parametrize("head", ["statistics", "trained"])
def test_add_shots_keeps_the_class_and_the_model_and_can_be_undone(head, request, demo_data, capsys):
    art = request.getfixturevalue("art" if head == "statistics" else "legacy_art")
    stats_before = (art / STATISTICS).read_bytes() if head == "statistics" else None
    paths = sorted(demo_data.train_dir.glob("*/*.jpg"))
    target = "Aurora_Nova_2015_2018"
    net, tax = artifact.load(art)
    y = np.array([tax.class_index[p.parent.name] for p in paths])
    own = y == tax.class_index[target]
    before = Predictor(net)(paths)["joint"].argmax(1)
    weights = artifact.load(art)[0].state_dict()

    shots = art.parent / "shots"
    shots.mkdir()
    for p in photos_of(demo_data, target)[:5]:
        shutil.copy(p, shots / p.name)
    code, out, err = run_cli("enroll", art, "--class", target, "--images", shots, "--add-shots", capsys=capsys)
    assert code == 0 and "added 5 shot(s) to base class" in out, err
    after = Predictor(artifact.load(art)[0])(paths)["joint"].argmax(1)
    # the unmapped blend took a demo model from 74% to 43% and captured 57 of 96 photos; now the class's
    # own photos are recognised at least as often, the whole set loses at most one photo in 50, and the
    # class takes at most 5% more of the other classes' photos (this tiny model is 24% accurate)
    assert (after[own] == y[own]).mean() >= (before[own] == y[own]).mean()
    assert (after == y).mean() >= (before == y).mean() - 0.02
    taken = lambda answers: int(((answers == tax.class_index[target]) & ~own).sum())   # noqa: E731
    assert taken(after) <= taken(before) + len(paths) // 20                  # measured: 2 -> 6 of 132

    code, out, err = run_cli("unenroll", art, "--class", target, capsys=capsys)
    assert code == 0 and "it is as trained again" in out, err
    restored = artifact.load(art)[0].state_dict()
    assert all(torch.equal(restored[k], weights[k]) for k in weights)      # exactly the trained model
    if stats_before is not None:                                           # and exactly its statistics
        a, b = ClassStatistics.load(art / STATISTICS), stats_before
        (art / "before.safetensors").write_bytes(b)
        b = ClassStatistics.load(art / "before.safetensors")
        assert a.classes == b.classes and np.array_equal(a.sums, b.sums) and not a.shot_counts.any()
    assert artifact.read_config(art)["enrolled"] == []
    assert not (art / "trained_rows.npy").exists() and not (art / "enrolled.npy").exists()
    code, _, err = run_cli("unenroll", art, "--class", target, capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "no added shots" in err


def test_add_shots_needs_the_flag_every_time(art, demo_data, capsys):
    target = "Aurora_Nova_2015_2018"
    shots = [str(p) for p in photos_of(demo_data, target)[:3]]
    assert run_cli("enroll", art, "--class", target, *image_flags(shots), "--add-shots", capsys=capsys)[0] == 0
    code, _, err = run_cli("enroll", art, "--class", target, *image_flags(shots), capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "--add-shots" in err
    more = [str(p) for p in photos_of(demo_data, target)[3:6]]     # the same three again would add nothing
    code, _, err = run_cli("enroll", art, "--class", target, *image_flags(more), "--add-shots", capsys=capsys)
    assert code == 0, err
    [entry] = artifact.read_config(art)["enrolled"]
    assert (entry["class"], entry["shots"], entry["base"], len(set(entry["md5"]))) == (target, 6, True, 6)


def test_add_shots_refused_without_prototypes(legacy_art, demo_data, capsys):
    art = legacy_art
    (art / "prototypes.npy").unlink()
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file() and p.name != ".hier.lock"}
    code, _, err = run_cli("enroll", art, "--class", "Aurora_Nova_2015_2018", "--add-shots",
                           *image_flags(photos_of(demo_data, "Aurora_Nova_2015_2018")[:3]), capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "prototypes.npy" in err
    assert before == {p.name: p.read_bytes() for p in art.iterdir() if p.is_file() and p.name != ".hier.lock"}


# --- what enrollment counts and says (issue 15, items 13 and 14) ----------------------------------------

ROOK = "Cinder_Rook_2019_2023"


def test_copies_of_a_photo_are_one_shot_and_enrolling_again_adds(art, demo_data, tmp_path, capsys):
    shots = tmp_path / "shots"
    shots.mkdir()
    first, second, third = photos_of(demo_data, n=3)
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
    before = files_and_modes(art)
    code, out, _ = run_cli("enroll", art, "--class", "Neu_Wagen_2025_2025", "--images", shots, capsys=capsys)
    assert code == 0 and "added nothing" in out and files_and_modes(art) == before
    stats = ClassStatistics.load(art / STATISTICS)
    assert artifact.read_config(art)["enrolled"][0]["shots"] == 3 == stats.shot_counts[stats.index["Neu_Wagen_2025_2025"]]


def test_a_near_duplicate_of_a_known_class_is_reported(art, demo_data, capsys):
    """Shots of a base class under a new name, with the strictest budget: it keeps none of its own shots
    (answered as the served answer is, with the temperature). Before: no word of it. Centred similarity
    0.98 to Cinder_Rook_2019_2023's prototype."""
    r = enrollment.enroll(art, "Twin_2025_2025", photos_of(demo_data, n=5), brand="Zephyr", max_base_drop=0)
    assert (r.new, r.added, r.total) == (True, 5, 5)
    assert r.own_shots_answered < enrollment.OWN_SHOTS and r.offset_cost >= 0
    assert r.near_duplicate["class"] == ROOK and r.near_duplicate["similarity"] >= enrollment.NEAR_DUPLICATE
    enrollment.unenroll(art, "Twin_2025_2025")
    code, out, err = run_cli("enroll", art, "--class", "Twin_2025_2025", "--brand", "Zephyr", "--max-base-drop", "0",
                             *image_flags(photos_of(demo_data, n=5)), capsys=capsys)
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
    code, _, err = run_cli("enroll", art, "--class", "Aurora_Nova_2024_2025", *image_flags(photos_of(demo_data, n=2)),
                           capsys=capsys)
    assert code == 0, err
    code, _, err = run_cli("enroll", art, "--class", "Aurora_Zeta_2025_2025", *image_flags(photos_of(demo_data, n=2)),
                           capsys=capsys)
    assert code == 0, err
    tax = artifact.load(art)[1]
    assert (tax.row("Aurora_Nova_2024_2025")["brand"], tax.row("Aurora_Nova_2024_2025")["model"]) == ("Aurora", "Nova")
    assert (tax.row("Aurora_Zeta_2025_2025")["brand"], tax.row("Aurora_Zeta_2025_2025")["model"]) == ("Aurora", "Zeta")
    assert len(tax.models) == 7 and len(tax.brands) == 3       # one new model, no new brand


# --- Unicode normalisation (issue 7, item 6) ------------------------------------------------------------

NFC_NAME = "쏘나타_DN8_2020_2023"                  # as in tests/data/test_files.py
NFD_NAME = unicodedata.normalize("NFD", NFC_NAME)


def test_enrolling_the_nfd_spelling_of_a_base_class_is_the_base_class(art, demo_data, capsys):
    rename_classes(art, {"Aurora_Nova_2015_2018": NFC_NAME})
    shots = photos_of(demo_data, "Cinder_Rook_2019_2023")[:3]
    code, _, err = run_cli("enroll", art, "--class", NFD_NAME, *image_flags(shots), capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "is a base class" in err
    new_nfd = unicodedata.normalize("NFD", "신형모델_2025_2025")
    assert run_cli("enroll", art, "--class", new_nfd, "--brand", unicodedata.normalize("NFD", "현대"),
                   *image_flags(shots), capsys=capsys)[0] == 0
    tax = artifact.load(art)[1]
    assert "신형모델_2025_2025" in tax.classes and tax.row("신형모델_2025_2025")["brand"] == "현대"
    assert run_cli("unenroll", art, "--class", "신형모델_2025_2025", capsys=capsys)[0] == 0


def test_enroll_says_in_words_what_it_changed_for_the_answers(art, demo_data):
    """Shots of a known class enrolled under a new name with the budget wide open: the words name the
    known class whose held-out photos it now takes, and the share is the served answer's (the one
    answer function, at the served temperature), not a score offset."""
    from hier.metrics import served_answer
    r = Recognizer(art).enroll(NEW, photos_of(demo_data, "Cinder_Rook_2019_2023", 5), brand="Zephyr",
                               max_base_drop=100)
    net, tax = artifact.load(art)
    z, y = read_validation(art)
    answers = served_answer(net.heads(z)["joint"].numpy(), net.cfg.temperature, tax.fine_to_model,
                            tax.fine_to_brand)[1]
    taken = answers == tax.class_index[NEW]
    assert taken.any() and r.base_photos_taken == pytest.approx(taken.mean())
    counts = np.bincount(y.numpy()[taken], minlength=len(tax))
    most = int(counts.argmax())                   # the known class most of the photos it takes are photos of
    assert r.taken_most_from == {"class": tax.classes[most], "photos": int(counts[most]),
                                 "of": int((y.numpy() == most).sum()),
                                 "share": pytest.approx(counts[most] / (y.numpy() == most).sum())}
    words = r.summary()
    assert f"{round(r.own_shots_answered * 5)} of these 5 photo(s) are answered as '{NEW}'" in words
    assert f"{taken.mean():.1%} are now answered as '{NEW}', most of them photos of '{tax.classes[most]}'" in words
    assert r.to_dict()["summary"] == words and "offset" in r.to_dict()
    # every changed answer counts, not only those answered as the class (the brand sum it joins can flip
    # another class's photo to one of its siblings): the held-out accuracy before and after, served
    assert r.base_accuracy_after == pytest.approx(float((answers == y.numpy()).mean()))
    assert r.base_accuracy_before > r.base_accuracy_after          # it takes photos its budget let it take
    assert f"answered right {r.base_accuracy_after:.1%} of the time (before: {r.base_accuracy_before:.1%})" in words


def test_shots_added_to_a_known_class_are_worded_too(art, demo_data):
    """``--add-shots`` to a base class said only how many shots it added: now also how many of them are
    answered as it and the held-out accuracy of the known classes before and after."""
    cls = "Cinder_Rook_2019_2023"
    r = Recognizer(art).enroll(cls, photos_of(demo_data, cls, 12)[-4:], add_shots=True)
    words = r.summary()
    assert r.base and r.own_shots_answered is not None and r.base_accuracy_before is not None
    assert f"of these 4 photo(s) are answered as '{cls}'" in words and "(before: " in words, words


def test_a_class_answered_on_few_of_its_photos_is_told_what_helps():
    """``POST /enroll`` said "0 of these 5 photo(s) are answered as ..." and nothing to do about it (the
    CLI alone warned): the summary itself says what helps, unless the class looks like a known one."""
    from hier.enrollment import Enrolled
    r = Enrolled(name="EV6_CV_2022_2025", head="statistics", mapped=False, base=False, new=True, calibrated=True,
                 duplicates=0, added=5, total=5, classes=13, offset=3.2, own_shots_answered=0.2, offset_cost=0.4)
    words = r.summary()
    assert "1 of these 5 photo(s) are answered as 'EV6_CV_2022_2025'. More (and more varied) photos" in words
    assert "a larger budget (max_base_drop) lets it take more, its offset costs it 40% of these." in words
    near = Enrolled(**{**r.__dict__, "near_duplicate": {"class": "K5_DL3_2020_2023", "similarity": 0.97}})
    assert "More (and more varied)" not in near.summary()        # the near-duplicate warning says what to do
    base = Enrolled(**{**r.__dict__, "base": True, "new": False, "offset": None, "offset_cost": None})
    assert "More (and more varied) photos of it make it stronger." in base.summary()     # --add-shots too


def test_the_budget_holds_for_the_served_answer_not_only_for_the_photos_the_class_takes():
    """A class joining brand A makes A's probability sum outweigh brand B for photos of B's one class,
    whose own score stays the highest: the served answer (brand first) flips them to A's classes, the
    new class never the answer itself. ``budget_offset`` counts only what the class takes (nothing here),
    so a weak 2-epoch model lost 10 points at a 0.8-point budget; ``served_offset`` raises the offset
    until the served answers are within the budget."""
    import torch

    from hier.enrollment.offsets import budget_offset, served_offset
    from hier.metrics import served_answer
    fine_to_model, fine_to_brand = np.array([0, 1, 2, 3]), np.array([0, 0, 1, 0])   # a1 a2 | b1 | new (A)
    rng = np.random.default_rng(0)
    b_photos = np.column_stack([np.full(50, 1.0), np.full(50, 1.0), np.full(50, 2.0), 1.2 + rng.normal(0, .05, 50)])
    a_photos = np.column_stack([np.full(50, 2.0), np.full(50, 0.0), np.full(50, 0.0), np.full(50, 0.5)])
    scores, y = np.vstack([b_photos, a_photos]).astype(np.float32), np.array([2] * 50 + [0] * 50)
    served = lambda off: (served_answer(scores - np.eye(4)[3] * off, 1.0, fine_to_model, fine_to_brand)[1] == y).mean()  # noqa: E731
    without = scores.copy()
    without[:, 3] = -np.inf
    assert (served_answer(without, 1.0, fine_to_model, fine_to_brand)[1] == y).mean() == 1.0
    flat = budget_offset(torch.from_numpy(scores), torch.from_numpy(y), 3, max_base_drop=1.0)
    assert (scores[:, 3] - flat < scores[:, :3].max(1)).all() and served(flat) < 0.6     # B's photos flipped
    offset = served_offset(scores, y, 3, flat, 1.0, 1.0, fine_to_model, fine_to_brand)
    assert served(offset) >= 0.99 and served(offset - 0.01) < 0.99 and offset > flat    # the smallest within it
    assert served_offset(scores, y, 3, offset + 1, 1.0, 1.0, fine_to_model, fine_to_brand) == offset + 1   # kept
