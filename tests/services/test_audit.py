"""`hier audit` on a drawn dataset with known faults: one exact duplicate within a class, one across
classes, one near-duplicate (a photo resized and recompressed), one truncated JPEG and one flat grey
photo; the audit finds exactly those, writes the exclude list they imply, refuses to overwrite one or
to clobber a folder it did not write, and reads the list back for training.

The fast tests embed with a stand-in (each photo's 16 x 16 pixels, centred and normalised) so the
counts are exact by construction; the artifact path runs the tiny artifact through the Predictor, and
the ImageNet trunk runs on real Stanford photos (slow, skipped when ../shared is absent)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import STANFORD, chromium, one_error_line, run_cli, tree
from PIL import Image, ImageDraw

import hier.audit.find as audit_find
import hier.audit.run as audit_mod
from hier.data.exclude import apply_exclude, read_exclude
from hier.data.readers import create_reader

SHAPES = {"Alpha Sedan 2012": ((200, 30, 30), "ellipse"), "Beta Coupe 2012": ((30, 60, 200), "rectangle"),
          "Gamma Van 2012": ((30, 160, 40), "polygon")}
PER_CLASS = 8


def draw(cls: str, k: int, size: int = 64) -> Image.Image:
    """A class's shape and colour on a random blocky background (seeded by class and index)."""
    rng = np.random.default_rng([list(SHAPES).index(cls), k])
    back = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(back).resize((size, size), Image.NEAREST)
    colour, shape = SHAPES[cls]
    dx, dy = rng.integers(-4, 5, 2)
    d = ImageDraw.Draw(im)
    box = (12 + dx, 12 + dy, 52 + dx, 52 + dy)
    if shape == "polygon":
        d.polygon([(32 + dx, 8 + dy), (56 + dx, 56 + dy), (8 + dx, 56 + dy)], fill=colour)
    else:
        getattr(d, shape)(box, fill=colour)
    return im


@pytest.fixture
def faulty(tmp_path):
    """DATA with 3 classes x 8 drawn photos, then the faults; returns (root, what was planted)."""
    root = tmp_path / "data"
    for cls in SHAPES:
        (root / cls).mkdir(parents=True)
        for k in range(PER_CLASS):
            draw(cls, k).save(root / cls / f"{k:02d}.jpg", quality=92)
    a, b, c = SHAPES
    shutil.copy(root / a / "00.jpg", root / a / "copy.jpg")                 # exact, within class
    shutil.copy(root / b / "01.jpg", root / c / "from_beta.jpg")            # exact, across classes
    Image.open(root / a / "02.jpg").resize((96, 96)).save(root / a / "02_small.jpg", quality=60)   # near
    (root / b / "broken.jpg").write_bytes((root / b / "03.jpg").read_bytes()[:400])               # corrupt
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / c / "grey.jpg")                      # outlier
    return root, {"copy": f"{a}/copy.jpg", "kept": f"{a}/00.jpg", "cross": [f"{b}/01.jpg", f"{c}/from_beta.jpg"],
                  "near": (f"{a}/02.jpg", f"{a}/02_small.jpg"), "broken": f"{b}/broken.jpg", "grey": f"{c}/grey.jpg"}


def pixels(items, rec=None, batch_size=64, progress=None) -> np.ndarray:
    """Stand-in embedding: 16 x 16 RGB, centred on mid-grey, unit length (resizing barely moves it)."""
    rows = []
    for p in items:
        x = np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BILINEAR), np.float32).ravel() / 255 - 0.5
        rows.append(x / max(np.linalg.norm(x), 1e-6))
    return np.stack(rows)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(audit_mod, "embed", pixels)


def test_audit_finds_exactly_the_planted_faults(faulty, stand_in, tmp_path, capsys):
    root, planted = faulty
    out, exclude = tmp_path / "audit", tmp_path / "exclude.txt"
    code, stdout, err = run_cli("audit", root, "--out", out, "--write-exclude", exclude, capsys=capsys)
    assert code == 0, err
    r = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    c = r["counts"]
    assert (c["images"], c["classes"], c["unreadable"]) == (3 * PER_CLASS + 4, 3, 1)
    assert (c["exact_groups"], c["exact_extra_copies"]) == (1, 1)
    assert (c["cross_class_groups"], c["cross_class_files"]) == (1, 2)
    assert (c["near_pairs"], c["near_cross_class_pairs"]) == (1, 0)
    within, cross = [g for g in r["exact_duplicates"] if not g["cross_class"]], \
        [g for g in r["exact_duplicates"] if g["cross_class"]]
    assert within[0]["paths"] == [planted["kept"], planted["copy"]]
    assert cross[0]["paths"] == planted["cross"] and cross[0]["classes"] == ["Beta Coupe 2012", "Gamma Van 2012"]
    assert (r["near_duplicates"][0]["a"], r["near_duplicates"][0]["b"]) == planted["near"]
    assert r["near_duplicates"][0]["cosine"] >= 0.93 == r["near_threshold"]
    assert r["unreadable"] == [{"path": planted["broken"], "reason": "unreadable"}]
    # outliers: the grey photo first; the Beta photo filed under Gamma is the other one flagged
    flagged = [o["path"] for o in r["outliers"] if o["flagged"]]
    assert flagged == [planted["grey"], planted["cross"][1]] and c["outliers"] == 2
    assert r["outliers"][0]["z"] < -3.5 < r["outliers"][2]["z"]
    # the exclude list: the second copy, both photos of the cross-class group (no outliers by default)
    want = sorted([planted["copy"], *planted["cross"]])
    assert exclude.read_text(encoding="utf-8").splitlines() == want == (out / "exclude.txt").read_text().splitlines()
    assert c["excluded"] == 3 and "3 paths" in stdout and "near-duplicate pairs 1 (cosine" in stdout
    assert "skipped 1 unreadable image(s)" in err
    html = (out / "audit.html").read_text(encoding="utf-8")
    for name in (planted["copy"], *planted["cross"], *planted["near"], planted["broken"], planted["grey"]):
        assert name in html, name
    assert "across classes" in html
    shown = r["outliers"]
    assert len(shown) == 3 * PER_CLASS + 4 and len(list((out / "thumbs").glob("outlier*.jpg"))) == len(shown)
    for png in ("counts.png", "sizes.png", "brightness.png", "outliers.png"):
        assert Image.open(out / png).size[0] > 300, png
    assert Image.open(out / "outliers.png").size[1] > 600        # 28 photos: 4 rows of the sheet


def test_a_resized_re_encoded_copy_is_found_by_its_perceptual_hash(faulty, monkeypatch, tmp_path, capsys):
    """An embedding that sees no two photos alike (random unit vectors: every cosine far under 0.93)
    still finds the copies a pHash sees: the planted resized photo, and a half-size JPEG quality 50 copy
    filed under another class, as a cross-class pair; no pair of distinct drawings, nor of flat photos
    (a blank photo's pHash is all zeros whatever its shade: every two paired before)."""
    root, planted = faulty
    a, b, c = SHAPES
    Image.open(root / b / "04.jpg").resize((32, 32)).save(root / c / "beta_half.jpg", quality=50)
    for k, cls in enumerate(SHAPES):                 # flat photos of other shades hash alike: not copies
        Image.new("RGB", (64, 64), (40 * k, 40 * k, 40 * k)).save(root / cls / f"flat{k}.jpg")

    def unlike(items, *args, **kwargs):
        z = np.random.default_rng(0).normal(size=(len(items), 256))
        return z / np.linalg.norm(z, axis=1, keepdims=True)
    monkeypatch.setattr(audit_mod, "embed", unlike)
    code, _, err = run_cli("audit", root, "--out", tmp_path / "audit", capsys=capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "audit" / "audit.json").read_text(encoding="utf-8"))
    found = {(p["a"], p["b"]): p for p in r["near_duplicates"]}
    assert set(found) == {planted["near"], (f"{b}/04.jpg", f"{c}/beta_half.jpg")}, found
    assert all(p["cosine"] < 0.5 and p["phash_bits"] <= r["phash_bits"] for p in found.values())
    assert found[(f"{b}/04.jpg", f"{c}/beta_half.jpg")]["cross_class"] and r["counts"]["near_cross_class_pairs"] == 1


def test_exclude_outliers_and_overwrite_refused(faulty, stand_in, tmp_path, capsys):
    root, planted = faulty
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("mine\n")
    out = tmp_path / "audit"
    code, _, err = run_cli("audit", root, "--out", out, "--write-exclude", exclude, capsys=capsys)
    assert one_error_line(code, err) and "exists; refused to overwrite" in err and "--force" in err, err
    assert exclude.read_text() == "mine\n" and not out.exists()        # refused before any work
    code, _, err = run_cli("audit", root, "--out", out, "--write-exclude", exclude, "--force",
                           "--exclude-outliers", "1", capsys=capsys)
    assert code == 0, err
    assert exclude.read_text(encoding="utf-8").splitlines() == sorted([planted["copy"], *planted["cross"], planted["grey"]])
    code, _, err = run_cli("audit", root, "--out", out, "--write-exclude", out / "x.txt", capsys=capsys)
    assert one_error_line(code, err) and "inside --out" in err, err


def test_audit_bad_input_is_one_line_and_writes_nothing(faulty, stand_in, tmp_path, capsys):
    root, _ = faulty
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.txt").write_text("mine")
    report = tmp_path / "report"                   # a hier report is not an audit
    report.mkdir()
    (report / ".hier-report").write_text(json.dumps({"files": []}))
    (report / "index.html").write_text("report")
    before = tree(tmp_path)
    for args, message in (([tmp_path / "nowhere", "--out", tmp_path / "a"], "data folder not found"),
                          ([root, "--out", busy], "is not an earlier hier audit"),
                          ([root, "--out", report], "is not an earlier hier audit"),
                          ([root, "--out", root / "audit"], "inside the data folder"),
                          ([root, "--out", tmp_path / "a", "--near", "2"], "--near must be"),
                          ([root, "--out", busy / "thesis.txt" / "audit"], "is a file, not a folder"),
                          ([root, "--out", tmp_path / "a", "--layout", "flat"], "unknown layout"),
                          ([root, "--out", tmp_path / "a", "--artifact", busy], "is not a hier artifact"),
                          ([root, "--out", tmp_path / "a", "--write-exclude", tmp_path / "no" / "x.txt"],
                           "does not exist")):
        code, _, err = run_cli("audit", *args, capsys=capsys)
        assert one_error_line(code, err) and message in err, (args, err)
    assert tree(tmp_path) == before
    only_broken = tmp_path / "broken"
    (only_broken / "cls").mkdir(parents=True)
    (only_broken / "cls" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    code, _, err = run_cli("audit", only_broken, "--out", tmp_path / "b", capsys=capsys)
    assert one_error_line(code, err) and "has no readable images" in err, err


def test_audit_replaces_only_its_own_earlier_audit(faulty, stand_in, tmp_path, capsys):
    root, _ = faulty
    out = tmp_path / "audit"
    assert run_cli("audit", root, "--out", out, capsys=capsys)[0] == 0
    marker = json.loads((out / audit_mod.MARKER).read_text(encoding="utf-8"))
    assert "audit.html" in marker["files"] and "thumbs/outlier0.jpg" in marker["files"]
    (root / "Alpha Sedan 2012" / "copy.jpg").unlink()
    assert run_cli("audit", root, "--out", out, capsys=capsys)[0] == 0        # replaced
    assert json.loads((out / "audit.json").read_text())["counts"]["exact_groups"] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("audit", root, "--out", out, capsys=capsys)
    assert one_error_line(code, err) and "also holds 'notes.txt'" in err, err
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary folder left


def test_read_and_apply_exclude(faulty, tmp_path):
    root, planted = faulty
    listing = tmp_path / "exclude.txt"
    listing.write_text(f"# dropped by hand\n{planted['copy']}\n\n{planted['cross'][0]}\n"
                       "Alpha Sedan 2012/gone.jpg\nnot/in/data.jpg\n", encoding="utf-8")
    names = read_exclude(listing, root)
    assert len(names) == 4
    images, _ = create_reader(root)()
    kept, missing = apply_exclude(images, names)
    assert missing == 2 and len(kept.paths) == len(images.paths) - 2 == len(kept.labels)
    assert root / planted["copy"] not in kept.paths and root / planted["kept"] in kept.paths
    assert kept.skipped == images.skipped and images.skipped["unreadable"] == 1
    # a path spelled with ./ is the same photo
    listing.write_text("./Alpha Sedan 2012/copy.jpg\n", encoding="utf-8")
    assert apply_exclude(images, read_exclude(listing, root))[1] == 0
    with pytest.raises(Exception, match="cannot read exclude file"):
        read_exclude(tmp_path / "missing.txt", root)


def test_exclude_list_takes_what_each_rule_names():
    exact = [{"paths": ["A/1.jpg", "A/2.jpg", "A/3.jpg"], "cross_class": False},
             {"paths": ["A/4.jpg", "B/4.jpg"], "cross_class": True}]
    near = [{"a": "A/5.jpg", "b": "B/5.jpg", "cross_class": True}, {"a": "A/6.jpg", "b": "A/7.jpg", "cross_class": False}]
    outliers = [{"path": "B/9.jpg"}, {"path": "A/2.jpg"}]
    assert audit_find.exclude_list(exact, []) == ["A/2.jpg", "A/3.jpg", "A/4.jpg", "B/4.jpg"]
    assert audit_find.exclude_list(exact, outliers, near) == ["A/2.jpg", "A/3.jpg", "A/4.jpg", "A/5.jpg", "B/4.jpg",
                                                             "B/5.jpg", "B/9.jpg"]


def test_audit_with_an_artifact_embeds_through_the_predictor(faulty, tiny_artifact, tmp_path, capsys):
    """The tiny artifact's 32-d embeddings: MD5 findings exact as ever, the resized copy its source's
    nearest photo (cosine > 0.99)."""
    root, planted = faulty
    out = tmp_path / "audit"
    code, _, err = run_cli("audit", root, "--out", out, "--artifact", tiny_artifact[0], "--near", "0.99",
                           capsys=capsys)
    assert code == 0, err
    r = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    c = r["counts"]
    assert (c["exact_groups"], c["cross_class_groups"], c["unreadable"]) == (1, 1, 1)
    assert r["embedding"] == "artifact"
    pair = {(p["a"], p["b"]) for p in r["near_duplicates"]}
    assert planted["near"] in pair
    assert ("may not tell these photos apart" in err) == (c["near_pairs_by_embedding_alone"] > c["images"] // 2)
    # at a --near the tiny 32-d embeddings cannot hold, pairs flood the list: the command says why
    code, _, err = run_cli("audit", root, "--out", tmp_path / "flood", "--artifact", tiny_artifact[0], "--near", "0.5",
                           capsys=capsys)
    flood = json.loads((tmp_path / "flood" / "audit.json").read_text(encoding="utf-8"))["counts"]
    assert code == 0 and flood["near_pairs_by_embedding_alone"] > flood["images"] // 2, flood
    assert "may not tell these photos apart; try without --artifact" in err


@pytest.mark.slow
@pytest.mark.skipif(not STANFORD.is_dir(), reason="../shared/data/stanford-cars-dev is absent")
def test_audit_with_the_imagenet_trunk_on_real_photos(tmp_path, capsys):
    """Three Stanford classes x 6 photos and the same faults: the offline ImageNet trunk finds exactly
    the resized copy as a near-duplicate at the default --near and puts the grey photo first among the
    outliers; the page loads in Chromium with every image."""
    root = tmp_path / "data"
    classes = sorted(p.name for p in STANFORD.iterdir() if p.is_dir())[:3]
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for photo in sorted((STANFORD / cls).glob("*.jpg"))[:6]:
            shutil.copy(photo, root / cls)
    a, b, c = (sorted((root / cls).glob("*.jpg")) for cls in classes)
    shutil.copy(a[0], a[0].with_name("copy.jpg"))
    shutil.copy(b[1], root / classes[2] / "from_b.jpg")
    big = Image.open(a[2]).convert("RGB")          # upscaled 1.5x and recompressed: cosine 0.95 to its source
    big.resize((big.width * 3 // 2, big.height * 3 // 2)).save(a[2].with_name("big.jpg"), quality=60)
    b[3].with_name("broken.jpg").write_bytes(b[3].read_bytes()[:2000])
    Image.new("RGB", (400, 300), (128, 128, 128)).save(root / classes[2] / "grey.jpg")
    out = tmp_path / "audit"
    code, _, err = run_cli("audit", root, "--out", out, capsys=capsys)
    assert code == 0, err
    r = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    cnt = r["counts"]
    assert (cnt["images"], cnt["exact_groups"], cnt["cross_class_groups"], cnt["unreadable"]) == (22, 1, 1, 1)
    assert [(p["a"], p["b"]) for p in r["near_duplicates"]] == \
        [(a[2].relative_to(root).as_posix(), f"{classes[0]}/big.jpg")]
    assert r["outliers"][0]["path"] == f"{classes[2]}/grey.jpg" and r["outliers"][0]["flagged"]
    with chromium() as browser:
        browser.get((out / "audit.html").as_uri())
        images = browser.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    assert len(images) == 3 + 2 + 1 + len(r["outliers"])
    assert all(ok for _, ok in images), [src for src, ok in images if not ok]
