"""Photos as users have them, decoded to 8-bit RGB (``hier.data`` images): 16- and 32-bit photos and float
TIFFs scaled rather than clipped, arrays of any depth (issue 15, item 8), the EXIF orientation applied and
decompression bombs skipped or refused (issue 7, item 7)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line_after_warnings, photos_of, run_cli, small_dataset, write_bomb
from PIL import Image

from hier import artifact
from hier.data import decode_upload, load_rgb, scan_folder, to_rgb
from hier.errors import HierError
from hier.runtime import Predictor

# --- high bit depth (issue 15, item 8) ------------------------------------------------------------------

GRADIENT = np.tile(np.arange(256, dtype=np.uint8), (6, 1))          # every 8-bit level, 6 rows


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


# --- photos as phones and scanners make them (issue 7, item 7) ------------------------------------------

def _with_orientation(src: Path, dst: Path) -> None:
    """The photo stored sideways, with EXIF Orientation 6 ("rotate 90 CW to view"), as a phone does."""
    im = Image.open(src).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(dst, exif=exif, quality=95)


def test_exif_orientation_is_applied(tiny_artifact, demo_data, tmp_path):
    src = tmp_path / "upright.jpg"                     # wider than tall, so a sideways decode shows
    Image.open(photos_of(demo_data, "Aurora_Nova_2015_2018")[0]).crop((0, 0, 64, 40)).save(src, quality=95)
    _with_orientation(src, tmp_path / "portrait.jpg")
    upright = load_rgb(src)
    turned = load_rgb(tmp_path / "portrait.jpg")
    assert turned.shape == upright.shape == (40, 64, 3)           # sideways pixels, shown upright
    assert np.abs(turned.astype(int) - upright.astype(int)).mean() < 6
    net = artifact.load(tiny_artifact[0])[0]
    a, b = Predictor(net)([src, tmp_path / "portrait.jpg"])["embedding"]
    assert float(a @ b) > 0.98


def test_decompression_bombs_are_skipped_or_refused(tiny_artifact, demo_data, tmp_path, capsys):
    data = small_dataset(demo_data, tmp_path / "data", classes=2, per_class=4)
    cls = sorted(p.name for p in data.iterdir())[0]
    write_bomb(data / cls / "huge.png")
    shutil.copy(photos_of(demo_data, cls)[5], data / cls / "jpeg_named.png")      # a JPEG named .png
    s = scan_folder(data)
    assert len(s.paths) == 9 and s.skipped["too large"] == 1
    assert "1 image(s) over PIL's 89-megapixel limit" in s.skipped_message()
    code, _, err = run_cli("predict", tiny_artifact[0], data / cls / "huge.png", capsys=capsys)
    assert one_error_line_after_warnings(code, err) and "too large" in err
