"""The data layer's basics: scanning a folder (corrupt files and non-images skipped), the test CSV, image
files given by name, the stratified split and k folds, seeded augmentation, the evaluation transform, and a
predicting process that imports neither albumentations nor scipy."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hier.data import (
    ImageDataset,
    eval_transform,
    image_files,
    loader,
    read_test_csv,
    scan_folder,
    split_indices,
    train_transform,
)
from hier.errors import HierError


def _jpeg(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)


def test_scan_skips_corrupt_and_non_images(tmp_path):
    for c in ("a", "b"):
        for i in range(3):
            _jpeg(tmp_path / c / f"{i}.jpg")
    good = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0")
    s = scan_folder(tmp_path)
    assert len(s.paths) == 6 and sorted(set(s.labels)) == ["a", "b"]
    assert (s.skipped["unreadable"], s.skipped["not an image"]) == (2, 1)
    assert s.skipped_message() == "skipped 2 unreadable image(s) and 1 non-image file(s)"


def test_scan_errors(tmp_path):
    with pytest.raises(HierError, match="not found"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(HierError, match="no class folders"):
        scan_folder(tmp_path)
    _jpeg(tmp_path / "a" / "0.jpg")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(HierError, match="empty_class has no readable images"):
        scan_folder(tmp_path)


def test_read_test_csv(tmp_path):
    _jpeg(tmp_path / "test" / "TEST_00000.jpg")
    csv = tmp_path / "test.csv"
    csv.write_text("ID,img_path\nTEST_00000,./test/TEST_00000.jpg\n")
    s = read_test_csv(csv)
    assert s.ids == ["TEST_00000"] and s.paths[0].is_file()
    csv.write_text("id,path\nTEST_00000,./test/TEST_00000.jpg\n")
    with pytest.raises(HierError, match="must have columns ID,img_path"):
        read_test_csv(csv)
    csv.write_text("ID,img_path\nTEST_00001,./test/TEST_00001.jpg\n")
    with pytest.raises(HierError, match="do not exist"):
        read_test_csv(csv)


def test_image_files_refuses_non_images(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(HierError, match="is not an image: .*x.txt"):
        image_files([tmp_path / "x.txt"])
    with pytest.raises(HierError, match="no such image"):
        image_files([tmp_path / "nope.jpg"])


def test_split_is_stratified_and_seeded():
    labels = [c for c in "abcd" for _ in range(10)]
    tr, va = split_indices(labels, 0.2, seed=3)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(40))
    assert sorted(np.array(labels)[va].tolist()) == sorted("aabbccdd")
    assert np.array_equal(va, split_indices(labels, 0.2, seed=3)[1])
    assert not np.array_equal(np.sort(va), np.sort(split_indices(labels, 0.2, seed=4)[1]))


def test_kfold_covers_each_image_once():
    labels = [c for c in "abc" for _ in range(10)]
    vals = [split_indices(labels, fold=k, folds=5)[1] for k in range(5)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(30))
    with pytest.raises(HierError, match="--fold"):
        split_indices(labels, fold=5, folds=5)


def test_seeded_augmentation_repeats_and_workers_differ(tmp_path):
    """`hier train --seed` reproduces its augmentations; each loader worker draws its own."""
    img = np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)

    def views(seed):
        tf = train_transform(64, seed=seed)
        return torch.stack([tf(image=img)["image"] for _ in range(4)])
    assert torch.equal(views(0), views(0))
    assert not torch.equal(views(0), views(1))
    for i in range(4):
        Image.fromarray(img).save(tmp_path / f"{i}.jpg")
    ds = ImageDataset(sorted(tmp_path.glob("*.jpg")), None, train_transform(64, seed=0))
    a, b = [x for x, _ in loader(ds, 2, workers=2)]           # one batch per worker, same source image
    assert not torch.equal(a, b)


@pytest.mark.parametrize("shape", [(80, 120, 3), (224, 224, 3), (31, 500, 3)])
def test_eval_transform_gives_albumentations_pixels(shape):
    """hier's evaluation transform is written without albumentations (predicting does not import it);
    it must give what training's validation saw through albumentations, every value to 1e-5."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2
    img = np.random.default_rng(shape[1]).integers(0, 256, shape, dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours = eval_transform(224, mean, std)(image=img)["image"]
    theirs = A.Compose([A.Resize(224, 224), A.Normalize(mean, std), ToTensorV2()])(image=img)["image"]
    assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == theirs.dtype == torch.float32
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)


def test_predicting_imports_neither_albumentations_nor_scipy(art, demo_data, tmp_path):
    """`hier predict` pays no import it does not use: albumentations, scipy and scikit-learn cost
    about 2 s of a command's start on 2 cores (README, "Prediction speed")."""
    photo = sorted(demo_data.train_dir.glob("*/*.jpg"))[0]
    code = ("import sys; from hier.cli.base import main; sys.argv = ['hier', 'predict', sys.argv[1], sys.argv[2], "
            "'--out', sys.argv[3]]\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'albumentations', 'scipy', 'sklearn'}))")
    done = subprocess.run([sys.executable, "-c", code, str(art), str(photo), str(tmp_path / "a.csv")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "a.csv").read_text().count("\n") >= 2


def test_folders_are_searched_recursively_and_bad_photos_skipped_unless_strict(tmp_path):
    for sub in ("2024/march", "2025"):
        for i in range(2):
            _jpeg(tmp_path / "photos" / sub / f"{i}.jpg")
    good = (tmp_path / "photos" / "2025" / "0.jpg").read_bytes()
    (tmp_path / "photos" / "2025" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "photos" / "README.txt").write_text("listing photos")
    (tmp_path / "photos" / ".cache").mkdir()
    _jpeg(tmp_path / "photos" / ".cache" / "thumb.jpg")
    found = image_files([tmp_path / "photos"])
    assert [p.relative_to(tmp_path / "photos").as_posix() for p in found.paths] == \
        ["2024/march/0.jpg", "2024/march/1.jpg", "2025/0.jpg", "2025/1.jpg"]
    assert found.skipped_message() == "skipped 1 unreadable image(s) and 1 non-image file(s)"
    with pytest.raises(HierError, match="is unreadable: .*broken.jpg .*--strict"):
        image_files([tmp_path / "photos"], strict=True)
    with pytest.raises(HierError, match="is unreadable"):               # named explicitly: always refused
        image_files([tmp_path / "photos" / "2025" / "broken.jpg"])
