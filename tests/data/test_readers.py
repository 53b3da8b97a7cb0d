"""Dataset readers: layout detection and the AI-hub layout, on a small tree generated in that exact shape,
and the same layout reached through a symlink (with a loop in the tree)."""
import json
import shutil

import numpy as np
import pytest
from conftest import run_cli

from hier.data import Crop, to_rgb
from hier.data.readers import create_reader, detect_layout
from hier.errors import HierError

# (brand folder, model folder, year folder) -> the label fields a well-formed JSON carries
TREE = {("BR_현대", "001_쏘나타", "2020_흰색_프리미엄"): ("현대", "쏘나타", "2020"),
        ("BR_현대", "002_그랜저", "2023_검정_캘리그라피"): ("현대", "그랜저", "2023"),
        ("BR_기아", "010_K5", "2021_회색_노블레스"): ("기아", "K5", "2021")}


def _label(brand, model, year, box=True):
    objects = [{"classId": "P01.번호판", "coords": {"tl": {"x": 20, "y": 40}, "br": {"x": 30, "y": 45}}}]
    if box:
        objects.insert(0, {"classId": "P00.차량전체", "coords": {"tl": {"x": 5, "y": 6}, "br": {"x": 50, "y": 40}}})
    return {"rawDataInfo": {"filename": "x.jpg", "brandName": brand, "modelName": model, "modelYear": year},
            "learningDataInfo": {"objects": objects}}


@pytest.fixture
def aihub(demo_data, tmp_path):
    """Four photos per class folder: three labelled with a box, and in the first folder one label
    malformed, one without a whole-car box and one photo without a label."""
    root = tmp_path / "aihub"
    photos = iter(sorted(demo_data.train_dir.glob("*/*.jpg")))
    for (b, m, y), fields in TREE.items():
        folder = root / b / m / y
        folder.mkdir(parents=True)
        for i in range(4):
            photo = folder / f"{m}_{i}.jpg"
            shutil.copy(next(photos), photo)
            label = photo.with_suffix(".json")
            if b == "BR_현대" and m == "001_쏘나타" and i == 0:
                label.write_text('{"rawDataInfo": {"brandName": ', encoding="utf-8")     # truncated JSON
            elif b == "BR_현대" and m == "001_쏘나타" and i == 1:
                label.write_text(json.dumps(_label(*fields, box=False), ensure_ascii=False), encoding="utf-8")
            elif b == "BR_현대" and m == "001_쏘나타" and i == 2:
                pass                                                                          # no label
            else:
                label.write_text(json.dumps(_label(*fields), ensure_ascii=False), encoding="utf-8")
    return root


def test_aihub_labels_build_the_taxonomy_and_the_crops(aihub, demo_data):
    assert detect_layout(aihub) == "aihub" and detect_layout(demo_data.train_dir) == "folder"
    images, tax = create_reader(aihub)()
    assert sorted(tax.classes) == ["K5_2021_2021", "그랜저_2023_2023", "쏘나타_2020_2020"]
    assert tax.row("K5_2021_2021")["brand"] == "기아" and tax.row("쏘나타_2020_2020")["model"] == "쏘나타"
    assert sorted(tax.brands) == ["기아", "현대"] and tax.years("그랜저_2023_2023") == "2023"
    assert len(images.paths) == 12 and images.labels.count("쏘나타_2020_2020") == 4
    crops = [p for p in images.paths if isinstance(p, Crop)]
    assert len(crops) == 9 and crops[0].box == (5.0, 6.0, 50.0, 40.0)
    assert to_rgb(crops[0]).shape == (34, 45, 3)               # the whole-car box, not the plate's
    assert images.skipped["label missing or malformed (folder names used)"] == 2
    assert images.skipped["no whole-car box (full photo used)"] == 1
    assert "2 label missing or malformed" in images.skipped_message()


def test_train_and_evaluate_on_the_aihub_layout(aihub, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli("train", aihub, "--out", out, "--model", "test_efficientnet", "--pretrained", "none",
                           "--img-size", "64", "--epochs", "1", "--batch-size", "4", "--val-frac", "0.25",
                           capsys=capsys)
    assert code == 0, err
    assert "skipped" in err and "no whole-car box" in err
    code, output, err = run_cli("evaluate", out, aihub, "--json", capsys=capsys)
    assert code == 0 and json.loads(output)["images"] == 12, err
    with pytest.raises(HierError, match="unknown layout"):
        create_reader(aihub, "coco")


def test_aihub_without_photos_in_the_layout(tmp_path):
    (tmp_path / "BR_현대").mkdir()
    (tmp_path / "BR_현대" / "x.json").write_text("{}")
    with pytest.raises(HierError, match="no photos in the AI-hub layout"):
        create_reader(tmp_path)()


def test_crop_of_a_degenerate_box_is_the_whole_photo(demo_data):
    photo = sorted(demo_data.train_dir.glob("*/*.jpg"))[0]
    full = to_rgb(photo)
    assert np.array_equal(to_rgb(Crop(photo, (10, 10, 10.5, 40))), full)
    assert to_rgb(Crop(photo, (-5, -5, 1000, 20))).shape == (20, full.shape[1], 3)     # clipped to the photo


# --- a symlinked tree (issue 15, item 15) ---------------------------------------------------------------

def test_aihub_layout_behind_a_symlink(demo_data, tmp_path):
    real = tmp_path / "real" / "BR_현대" / "001_쏘나타" / "2020_흰색_프리미엄"
    real.mkdir(parents=True)
    for i, p in enumerate(sorted(demo_data.train_dir.glob("*/*.jpg"))[:2]):
        shutil.copy(p, real / f"{i}.jpg")
        (real / f"{i}.json").write_text(json.dumps({"rawDataInfo": {"brandName": "현대", "modelName": "쏘나타",
                                                                    "modelYear": "2020"}}), encoding="utf-8")
    root = tmp_path / "aihub"
    root.mkdir()
    (root / "BR_현대").symlink_to(tmp_path / "real" / "BR_현대", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert detect_layout(root) == "aihub"
    images, tax = create_reader(root)()
    assert len(images.paths) == 2 and tax.classes == ["쏘나타_2020_2020"]
