"""Inputs: high-bit-depth photos, users' CSVs, symlinked trees, repeated files, crops' names, numeric
flags and text encodings (issue 15, items 3, 8, 10, 11, 13, 15)."""
import ast
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hier.data import decode_upload, image_files, load_rgb, read_table, read_test_csv, to_rgb
from hier.data.detect import crop_folder
from hier.data.readers import create_reader, detect_layout
from hier.errors import HierError

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
GRADIENT = np.tile(np.arange(256, dtype=np.uint8), (6, 1))          # every 8-bit level, 6 rows


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def _photo(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _files(root):
    """Every file below root with its bytes: refusals leave them as they were."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# --- 8. high bit depth --------------------------------------------------------------------------------

def test_16_bit_and_32_bit_photos_are_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips I;16 / I / F to 255: a 16-bit gradient came out white (0 then 255s)."""
    Image.fromarray(GRADIENT.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(GRADIENT.astype(np.uint16) * 257).save(tmp_path / "g16.tif")
    Image.frombytes("I;16B", (256, 6), (GRADIENT.astype(">u2") * 257).tobytes()).save(tmp_path / "g16b.tif")
    Image.fromarray(GRADIENT.astype(np.float32) / 255).save(tmp_path / "f32.tif")
    Image.fromarray(GRADIENT.astype(np.int32) * 257).save(tmp_path / "i32.tif")
    assert [Image.open(tmp_path / n).mode for n in ("g16.png", "g16.tif", "g16b.tif", "f32.tif", "i32.tif")] == \
        ["I;16", "I;16", "I;16B", "F", "I"]
    for name in ("g16.png", "g16.tif", "g16b.tif", "f32.tif", "i32.tif"):
        path = tmp_path / name
        for rgb in (load_rgb(path), decode_upload(path.read_bytes(), name), to_rgb(Image.open(path)), to_rgb(path)):
            assert rgb.shape == (6, 256, 3) and rgb.dtype == np.uint8, name
            assert np.abs(rgb.astype(int) - GRADIENT[..., None]).max() <= 1, name


def test_float_tiffs_out_of_0_1_are_stretched(tmp_path):
    Image.fromarray(GRADIENT.astype(np.float32) * 10 - 1000).save(tmp_path / "wide.tif")      # -1000 .. 1550
    rgb = load_rgb(tmp_path / "wide.tif")[..., 0].astype(int)
    assert rgb.min() == 0 and rgb.max() == 255 and np.abs(rgb - GRADIENT).max() <= 1


@pytest.mark.parametrize("array", [
    GRADIENT.astype(np.uint16) * 257,                            # a 16-bit photo
    np.stack([GRADIENT.astype(np.uint16) * 257] * 3, -1),        # 16-bit RGB (PIL cannot hold it)
    GRADIENT.astype(np.float32) / 255,                           # float in 0..1
    GRADIENT.astype(np.float64),                                 # float in 0..255 (after arithmetic)
    GRADIENT.astype(np.int64),                                   # int in 0..255 (after arithmetic)
    GRADIENT.astype(np.int32) * 257,                             # int in 0..65535
    GRADIENT[..., None],                                         # H x W x 1
], ids=["uint16", "uint16-rgb", "float01", "float255", "int64", "int32-16bit", "hw1"])
def test_arrays_of_any_depth_are_scaled(array):
    rgb = to_rgb(array)
    assert rgb.shape == (6, 256, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - GRADIENT[..., None]).max() <= 1


def test_arrays_that_are_no_image_are_one_line():
    for bad in (np.zeros((4, 4), np.complex64), np.zeros((0, 5), np.uint8), np.zeros((4, 4, 2), np.uint8)):
        with pytest.raises(HierError, match="image|pixels"):
            to_rgb(bad)
    assert to_rgb(np.array([[np.nan, 0.5], [np.inf, 1.0]], np.float32))[..., 0].tolist() == [[128, 128], [255, 255]]


def test_a_16_bit_photo_gets_the_answer_of_its_8_bit_version(tiny_artifact, demo_data, tmp_path, capsys):
    grey = np.asarray(Image.open(sorted(demo_data.train_dir.glob("*/*.jpg"))[0]).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    code, out, err = run_cli("predict", tiny_artifact[0], tmp_path / "grey8.png", tmp_path / "grey16.png",
                             "--format", "json", "--topk", "3", capsys=capsys)
    assert code == 0, err
    rows = json.loads(out)
    by = {Path(r["image"]).name: [(x["class"], x["p"]) for x in rows if x["image"] == r["image"]] for r in rows}
    assert [c for c, _ in by["grey16.png"]] == [c for c, _ in by["grey8.png"]]
    np.testing.assert_allclose([p for _, p in by["grey16.png"]], [p for _, p in by["grey8.png"]], atol=1e-4)


# --- 10. users' CSVs ----------------------------------------------------------------------------------

BAD_CSVS = {
    "latin1": ("ID,img_path\nTEST_é,a.jpg\n".encode("latin-1"), "is not UTF-8: byte 0xe9 at offset"),
    "empty": (b"", "is empty (0 bytes)"),
    "header only": (b"ID,img_path\n", "has a header but no rows"),
    "open quote": (b'ID,img_path\nA,"a.jpg\nB,b.jpg\n', "the quote opened on line 2 is never closed"),
    "utf-16 without BOM": ("ID,img_path\nA,a.jpg\n".encode("utf-16-le"), "NUL"),
    "repeated column": (b"ID,ID,img_path\nA,B,a.jpg\n", "names column 'ID' twice"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_a_bad_test_csv_is_one_line(case, tiny_artifact, demo_data, tmp_path, capsys):
    data, message = BAD_CSVS[case]
    csv = tmp_path / "test.csv"
    csv.write_bytes(data)
    before = _files(tmp_path)
    code, _, err = run_cli("predict", tiny_artifact[0], "--test-csv", csv, "--sample-submission",
                           demo_data.sample_submission, "--out", tmp_path / "sub.csv", capsys=capsys)
    assert _one_line_error(code, err) and message in err and "test.csv" in err, err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("case", ["latin1", "empty", "header only", "open quote"])
def test_a_bad_listings_csv_or_sample_submission_is_one_line(case, art, demo_data, tmp_path, capsys):
    data, message = BAD_CSVS[case]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(data.replace(b"ID,img_path", b"listing_id,image"))
    code, _, err = run_cli("index", "build", art, bad, capsys=capsys)
    assert _one_line_error(code, err) and message in err and "listings CSV" in err, err
    assert not (art / "gallery").exists()
    bad.write_bytes(data)
    code, _, err = run_cli("predict", art, "--test-csv", demo_data.test_csv, "--sample-submission", bad,
                           "--out", tmp_path / "sub.csv", capsys=capsys)
    assert _one_line_error(code, err) and message in err and "sample submission" in err, err
    assert not (tmp_path / "sub.csv").exists()


def test_utf16_csvs_are_read_and_cells_stay_as_written(tiny_artifact, demo_data, tmp_path, capsys):
    """A UTF-16 test CSV and sample (Excel's "Unicode text") are read; IDs 'NA' / 'None' / 'é' stay
    text (pandas read 'NA' as missing: 'empty ID cell'); the answer is written in the sample's encoding."""
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[:3]
    ids = ["NA", "None", "TEST_é"]
    csv = tmp_path / "test.csv"
    csv.write_bytes(pd.DataFrame({"ID": ids, "img_path": photos}).to_csv(index=False).encode("utf-16"))
    assert read_test_csv(csv).ids == ids
    classes = pd.read_csv(demo_data.sample_submission, encoding="utf-8-sig", nrows=0).columns[1:]
    sample = tmp_path / "sample.csv"
    sample.write_bytes(pd.DataFrame(0.0, index=ids[::-1], columns=classes).rename_axis("ID").reset_index()
                       .to_csv(index=False).encode("utf-16"))
    code, out, err = run_cli("predict", tiny_artifact[0], "--test-csv", csv, "--sample-submission", sample,
                             "--out", tmp_path / "sub.csv", capsys=capsys)
    assert code == 0, err
    raw = (tmp_path / "sub.csv").read_bytes()
    assert raw[:2] == b"\xff\xfe"
    sub = pd.read_csv(io.StringIO(raw.decode("utf-16")), dtype={"ID": str}, keep_default_na=False)
    assert sub["ID"].tolist() == ids[::-1] and np.allclose(sub.iloc[:, 1:].sum(1), 1)


def test_read_table_keeps_strings_and_names_repeats(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes("\ufeffID,n\nnull,01\nN/A,2\n".encode("utf-8"))
    t = read_table(f, "table", ["ID"])
    assert t["ID"].tolist() == ["null", "N/A"] and t["n"].tolist() == ["01", "2"]
    assert t.attrs["encoding"] == "utf-8-sig"
    f.write_text("ID,img_path\nA,a.jpg\nB,b.jpg\nA,c.jpg\n", encoding="utf-8")
    for p in "abc":
        _photo(tmp_path / f"{p}.jpg")
    with pytest.raises(HierError, match=r"lists ID 'A' twice \(rows 2 and 4\)"):
        read_test_csv(f)


@pytest.mark.parametrize("content", [b"listing notes\n", "jpeg"])
def test_a_detector_that_is_no_model_is_one_line(content, tmp_path, capsys):
    pytest.importorskip("ultralytics")
    data = tmp_path / "data"
    _photo(data / "a" / "0.jpg")
    weights = tmp_path / ("notes.txt" if content != "jpeg" else "photo.jpg")
    if content == "jpeg":
        shutil.copy(data / "a" / "0.jpg", weights)
    else:
        weights.write_bytes(content)
    code, _, err = run_cli("crop", data, "--out", tmp_path / "crops", "--detector", weights, capsys=capsys)
    assert _one_line_error(code, err) and "cannot load detector" in err and len(err) < 300, err
    assert not (tmp_path / "crops").exists()


# --- 13. repeats and names ----------------------------------------------------------------------------

class _NoBoxes:
    """A detector that finds nothing: every photo is copied whole (``crop_folder``'s fallback)."""

    def boxes(self, paths):
        return [None] * len(paths)


def test_crops_keep_each_file_name_and_never_overwrite(tmp_path):
    """a.jpg and a.png in one folder were both saved as a.jpg, the second over the first."""
    data = tmp_path / "data"
    _photo(data / "cls" / "a.jpg", (200, 30, 30))
    _photo(data / "cls" / "a.png", (30, 30, 200))
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


def test_a_repeated_listing_id_names_both_files_or_both_rows(art, tmp_path, capsys):
    folder = tmp_path / "listings"
    _photo(folder / "a.jpg")
    _photo(folder / "a.png", (10, 200, 10))
    code, _, err = run_cli("index", "build", art, folder, capsys=capsys)
    assert _one_line_error(code, err) and "listing_id 'a' repeats" in err and "a.jpg and a.png" in err, err
    csv = tmp_path / "listings.csv"
    csv.write_text(f"listing_id,image\nx,{folder / 'a.jpg'}\ny,{folder / 'a.png'}\nx,{folder / 'a.png'}\n",
                   encoding="utf-8")
    code, _, err = run_cli("index", "build", art, csv, capsys=capsys)
    assert _one_line_error(code, err) and "listing_id 'x' repeats (rows 2 and 4)" in err, err
    assert not (art / "gallery").exists()


def test_a_file_given_twice_is_taken_once(tiny_artifact, tmp_path, capsys):
    folder = tmp_path / "photos"
    a, b = _photo(folder / "a.jpg"), _photo(folder / "b.jpg", (0, 90, 200))
    found = image_files([a, a, folder, tmp_path / "photos" / ".." / "photos" / "b.jpg"])
    assert found.paths == [a, b]
    assert found.skipped_message() == "skipped 3 repeat(s) of a file already given"
    code, out, err = run_cli("predict", tiny_artifact[0], a, a, "--format", "csv", "--topk", "2", capsys=capsys)
    assert code == 0, err
    rows = pd.read_csv(io.StringIO(out))
    assert len(rows) == 2 and rows["rank"].tolist() == [1, 2] and "repeat" in err


# --- 15. symlinked trees ------------------------------------------------------------------------------

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


def test_crop_folder_mirrors_a_symlinked_tree(linked, tmp_path):
    subset, classes = linked
    r = crop_folder(subset, tmp_path / "crops", _NoBoxes())
    written = sorted(p.relative_to(tmp_path / "crops").as_posix() for p in (tmp_path / "crops").rglob("*.jpg"))
    assert r["photos"] == 6 and written == sorted(f"{c}/{p.name}" for c in classes for p in (subset / c).iterdir())


def test_a_dangling_symlink_given_by_name_is_one_line(tmp_path, tiny_artifact, capsys):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    code, _, err = run_cli("predict", tiny_artifact[0], tmp_path / "gone.jpg", capsys=capsys)
    assert _one_line_error(code, err) and "leads nowhere" in err


# --- 3. numeric flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["predict", "{art}", "{photo}", "--batch-size", "0"], "--batch-size"),
    (["predict", "{art}", "{photo}", "--batch-size", "-3"], "--batch-size"),
    (["predict", "{art}", "{photo}", "--batch-size", "100000000"], "--batch-size"),
    (["predict", "{art}", "{photo}", "--topk", "-1"], "--topk"),
    (["similar", "{art}", "{photo}", "--k", "-1"], "--k"),
    (["similar", "{art}", "{photo}", "--k", "0"], "--k"),
])
def test_numeric_flags_out_of_range_are_one_line(args, flag, tiny_artifact, demo_data, capsys):
    photo = sorted(demo_data.train_dir.glob("*/*.jpg"))[0]
    code, _, err = run_cli(*[a.format(art=tiny_artifact[0], photo=photo) for a in args], capsys=capsys)
    assert _one_line_error(code, err) and flag in err, err


# --- 11. UTF-8 everywhere -----------------------------------------------------------------------------

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


@pytest.mark.slow
def test_listings_and_test_csvs_in_an_ascii_locale(art, demo_data, tmp_path):
    """Under LANG=C without UTF-8 mode, Korean listings and IDs are read, indexed and read back."""
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))[:2]
    csv = tmp_path / "listings.csv"
    pd.DataFrame({"listing_id": ["신형모델_1", "신형모델_2"], "image": photos, "판매자": ["김", "이"]}) \
        .to_csv(csv, index=False, encoding="utf-8")
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom hier.gallery import Gallery, read_listings\n"
                      "from hier.services.indexing import build\n"
                      "build(sys.argv[1], read_listings(Path(sys.argv[2])))\n"
                      "g = Gallery.load(sys.argv[1])\n"
                      "print(sorted(g.listings['listing_id']) == ['신형모델_1', '신형모델_2'],"
                      " sorted(g.listings['판매자']) == ['김', '이'])\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, str(script), str(art), str(csv)], capture_output=True, text=True,
                       env=env, timeout=300, encoding="utf-8")
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr[-2000:]
