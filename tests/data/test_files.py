"""Which files a command takes, and the crops it writes of them (``hier.data.files``, ``hier.data.detect``).

Symlinked folders are followed once, loops and dangling links skipped (issue 15, item 15); a file given
twice is taken once (item 13); folder names in NFD match an NFC taxonomy and NFC / NFD twins are one class
(issue 7, item 6); crops keep each file's name and never overwrite one another, mirror a symlinked tree, and a
detector that is no model is one line (issue 15, items 13, 15 and 10)."""
from __future__ import annotations

import io
import shutil
import unicodedata
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, photos_of, plain_photo, run_cli
from PIL import Image

from hier.data import image_files
from hier.data.detect import crop_folder
from hier.data.readers import detect_layout
from hier.data.split import training_split
from hier.errors import HierError
from hier.taxonomy import Taxonomy

# --- symlinked trees (issue 15, item 15) ----------------------------------------------------------------

@pytest.fixture
def linked(demo_data, tmp_path):
    """A subset assembled from symlinks: two symlinked class folders, a symlinked photo, a symlink to
    an ancestor (a loop), a dangling symlink and a second link to a folder already linked."""
    real = tmp_path / "real"
    classes = sorted(p.name for p in demo_data.train_dir.iterdir())[:2]
    for c in classes:
        (real / c).mkdir(parents=True)
        for p in sorted((demo_data.train_dir / c).glob("*.jpg"))[:3]:
            shutil.copy(p, real / c / p.name)
    subset = tmp_path / "subset"
    subset.mkdir()
    for c in classes:
        (subset / c).symlink_to(real / c, target_is_directory=True)
    (subset / "extra").mkdir()
    (subset / "extra" / "one.jpg").symlink_to(sorted((real / classes[0]).glob("*.jpg"))[0])
    (subset / "extra" / "loop").symlink_to(subset, target_is_directory=True)
    (subset / "extra" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (subset / "extra" / "again").symlink_to(real / classes[1], target_is_directory=True)
    return subset, classes


def test_symlinked_folders_are_followed_once(linked):
    subset, classes = linked
    found = image_files([subset])
    rel = [p.relative_to(subset).as_posix() for p in found.paths]
    assert rel == sorted(f"{c}/{p.name}" for c in classes for p in (subset / c).iterdir())
    assert found.skipped == Counter({"folder reached twice": 2, "dangling symlink": 1, "repeated": 1})
    assert "2 symlinked folder(s) already searched" in found.skipped_message()
    assert detect_layout(subset) == "folder"


def test_predict_index_and_enroll_take_symlinked_folders(linked, art, capsys):
    """All three answered "no images given": Path.rglob does not follow symlinked folders (3.11)."""
    subset, classes = linked
    code, out, err = run_cli("predict", art, subset, "--format", "csv", "--topk", "1", capsys=capsys)
    assert code == 0, err
    assert len(pd.read_csv(io.StringIO(out))) == 6
    code, out, err = run_cli("index", "build", art, subset, capsys=capsys)
    assert code == 0 and "indexed 6 listing image(s)" in out, err
    from hier.gallery.gallery import Gallery
    assert sorted(Gallery.load(art).listings["listing_id"])[0] == f"{classes[0]}/" + \
        sorted(p.stem for p in (subset / classes[0]).iterdir())[0]
    code, out, err = run_cli("enroll", art, "--class", "Zephyr_Gale_2025_2025", "--brand", "Zephyr",
                             "--images", subset / classes[0], capsys=capsys)
    assert code == 0 and "from 3 shot" in out, out + err


def test_a_dangling_symlink_given_by_name_is_one_line(tmp_path, tiny_artifact, capsys):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    code, _, err = run_cli("predict", tiny_artifact[0], tmp_path / "gone.jpg", capsys=capsys)
    assert one_error_line(code, err) and "leads nowhere" in err


# --- a file given twice (issue 15, item 13) -------------------------------------------------------------

def test_a_file_given_twice_is_taken_once(tiny_artifact, tmp_path, capsys):
    folder = tmp_path / "photos"
    a, b = plain_photo(folder / "a.jpg"), plain_photo(folder / "b.jpg", (0, 90, 200))
    found = image_files([a, a, folder, tmp_path / "photos" / ".." / "photos" / "b.jpg"])
    assert found.paths == [a, b]
    assert found.skipped_message() == "skipped 3 repeat(s) of a file already given"
    code, out, err = run_cli("predict", tiny_artifact[0], a, a, "--format", "csv", "--topk", "2", capsys=capsys)
    assert code == 0, err
    rows = pd.read_csv(io.StringIO(out))
    assert len(rows) == 2 and rows["rank"].tolist() == [1, 2] and "repeat" in err


# --- Unicode normalisation (issue 7, item 6) ------------------------------------------------------------

NFC_NAME = "쏘나타_DN8_2020_2023"
NFD_NAME = unicodedata.normalize("NFD", NFC_NAME)


def test_nfd_folders_match_an_nfc_taxonomy_and_twins_merge(demo_data, tmp_path):
    assert NFC_NAME != NFD_NAME
    src = photos_of(demo_data, "Aurora_Nova_2015_2018")
    for name, files in ((NFD_NAME, src[:4]), (NFC_NAME, src[4:8]), ("그랜저_GN7_2023_2025", src[8:12])):
        (tmp_path / "data" / name).mkdir(parents=True)
        for p in files:
            shutil.copy(p, tmp_path / "data" / name / p.name)
    (tmp_path / "tax.csv").write_text(
        "class,brand,model,year_start,year_end\n"
        f"{NFC_NAME},현대,쏘나타,2020,2023\n그랜저_GN7_2023_2025,현대,그랜저,2023,2025\n", encoding="utf-8")
    split = training_split(tmp_path / "data", Taxonomy.from_csv(tmp_path / "tax.csv"), {"val_frac": 0})
    images, tax = split.images, split.taxonomy
    assert tax.classes == [NFC_NAME, "그랜저_GN7_2023_2025"]
    assert images.labels.count(NFC_NAME) == 8                     # NFC and NFD twins are one class
    nfd_tax = tmp_path / "nfd.csv"                                # and an NFD taxonomy reads as NFC
    nfd_tax.write_text(unicodedata.normalize("NFD", (tmp_path / "tax.csv").read_text()), encoding="utf-8")
    assert Taxonomy.from_csv(nfd_tax).classes == tax.classes


# --- crops (issue 15, items 13, 15 and 10) --------------------------------------------------------------

class _NoBoxes:
    """A detector that finds nothing: every photo is copied whole (``crop_folder``'s fallback)."""

    def boxes(self, paths):
        return [None] * len(paths)


def test_crops_keep_each_file_name_and_never_overwrite(tmp_path):
    """a.jpg and a.png in one folder were both saved as a.jpg, the second over the first."""
    data = tmp_path / "data"
    plain_photo(data / "cls" / "a.jpg", (200, 30, 30))
    plain_photo(data / "cls" / "a.png", (30, 30, 200))
    r = crop_folder(data, tmp_path / "crops", _NoBoxes())
    out = tmp_path / "crops" / "cls"
    assert r["photos"] == 2 and sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.png"]
    assert Image.open(out / "a.png").format == "PNG" and Image.open(out / "a.jpg").format == "JPEG"
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), np.asarray(Image.open(data / "cls" / "a.png")))
    assert np.abs(np.asarray(Image.open(out / "a.jpg")).astype(int) - (200, 30, 30)).max() <= 3
    # a name PIL cannot write gets .jpg appended; where that meets a real file, refused before any work
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(data / "cls" / "a.jpg", clash / "x.heic")
    shutil.copy(data / "cls" / "a.jpg", clash / "x.heic.jpg")
    with pytest.raises(HierError, match=r"x\.heic and .*x\.heic\.jpg would both be cropped to .*x\.heic\.jpg"):
        crop_folder(clash, tmp_path / "crops2", _NoBoxes())
    assert not (tmp_path / "crops2").exists() or not any((tmp_path / "crops2").iterdir())


def test_crop_folder_mirrors_a_symlinked_tree(linked, tmp_path):
    subset, classes = linked
    r = crop_folder(subset, tmp_path / "crops", _NoBoxes())
    written = sorted(p.relative_to(tmp_path / "crops").as_posix() for p in (tmp_path / "crops").rglob("*.jpg"))
    assert r["photos"] == 6 and written == sorted(f"{c}/{p.name}" for c in classes for p in (subset / c).iterdir())


@pytest.mark.parametrize("content", [b"listing notes\n", "jpeg"])
def test_a_detector_that_is_no_model_is_one_line(content, tmp_path, capsys):
    pytest.importorskip("ultralytics")
    data = tmp_path / "data"
    plain_photo(data / "a" / "0.jpg")
    weights = tmp_path / ("notes.txt" if content != "jpeg" else "photo.jpg")
    if content == "jpeg":
        shutil.copy(data / "a" / "0.jpg", weights)
    else:
        weights.write_bytes(content)
    code, _, err = run_cli("crop", data, "--out", tmp_path / "crops", "--detector", weights, capsys=capsys)
    assert one_error_line(code, err) and "cannot load detector" in err and len(err) < 300, err
    assert not (tmp_path / "crops").exists()
