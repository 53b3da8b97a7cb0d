"""Shared fixtures: a small drawn dataset and one tiny trained artifact, built once per session; and the
helpers that tests of several packages use (``from conftest import ...``: this folder is on sys.path for
every test folder below it)."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from hier import fileio
from hier.cli import main
from hier.data.demo import make_demo_dataset
from hier.models import ModelConfig
from hier.taxonomy import Taxonomy
from hier.training.config import TrainConfig
from hier.training.run import train

ROOT = Path(__file__).resolve().parents[1]             # the project: PYTHONPATH for `python -m hier`
SHARED = Path(__file__).resolve().parents[2] / "shared"
STANFORD = SHARED / "data" / "stanford-cars-dev" / "train"


def run_cli(*args, capsys=None) -> tuple[int, str, str]:
    """Run ``hier ARGS`` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["hier", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", images_per_class=12,
                             test_images_per_class=2, img_size=64)


TINY = ModelConfig(trunk="test_efficientnet", img_size=64, embed_dim=32)


@pytest.fixture(scope="session")
def tiny_artifact(demo_data, tmp_path_factory):
    """test_efficientnet (0.1 M params) from scratch, 64 px, 12 epochs: about 6 s on 2 CPU cores."""
    out = tmp_path_factory.mktemp("run") / "artifact"
    metrics = train(demo_data.train_dir, out, Taxonomy.from_csv(demo_data.taxonomy), ModelConfig(**vars(TINY)),
                    TrainConfig(epochs=12, batch_size=16, lr=3e-3, head_lr=1e-2, pretrained="none", ema=True,
                                ema_decay=0.9))
    return out, metrics


@pytest.fixture
def art(tiny_artifact, tmp_path):
    """A copy of the tiny artifact a test may change."""
    dst = tmp_path / "artifact"
    shutil.copytree(tiny_artifact[0], dst)
    return dst


def rename_classes(path: Path, names: dict[str, str], brands: dict[str, str] | None = None) -> None:
    """Rename classes (and brands) of an artifact in place, in its taxonomy and its class statistics."""
    import pandas as pd

    from hier.artifact.files import STATISTICS
    from hier.models.statistics import ClassStatistics

    table = pd.read_csv(path / "taxonomy.csv", dtype=str, keep_default_na=False)
    table["class"] = table["class"].replace(names)
    table["brand"] = table["brand"].replace(brands or {})
    table.to_csv(path / "taxonomy.csv", index=False, encoding="utf-8")
    stats = ClassStatistics.load(path / STATISTICS)
    stats.classes = [names.get(c, c) for c in stats.classes]
    stats.index = {c: i for i, c in enumerate(stats.classes)}
    stats.save(path / STATISTICS)
    heads = path / "heads.safetensors"                # the head rows are stored under their names too
    if heads.is_file():
        import json

        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(heads, "pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        for part, renamed in (("fine", names), ("brand", brands or {})):
            meta[part] = json.dumps([renamed.get(n, n) for n in json.loads(meta[part])], ensure_ascii=False)
        save_file(state, heads, metadata=meta)


def make_legacy(path: Path, demo_data) -> Path:
    """Turn an artifact into one an older hier wrote: served by its trained head, base-class prototypes
    (mean embeddings of the training photos) instead of class statistics, no weights fingerprint, the
    heads inside model.safetensors (no heads.safetensors)."""
    import numpy as np

    from hier import artifact
    from hier.artifact.files import PROTOTYPES, STATISTICS
    from hier.models.statistics import class_means
    from hier.runtime import Predictor

    net, tax = artifact.load(path)
    photos = sorted(demo_data.train_dir.glob("*/*.jpg"))
    z = Predictor(net)(photos)["embedding"]
    fileio.save_npy(path / PROTOTYPES, class_means(z, np.array([tax.class_index[p.parent.name] for p in photos]),
                                                     len(tax)))
    config = artifact.read_config(path)
    config["model"].pop("head")
    config.pop("fingerprint")
    fileio.write_json(path / artifact.CONFIG, config)
    (path / STATISTICS).unlink()
    from safetensors.torch import load_file, save_file  # one weights file, the heads in it
    save_file({**load_file(path / artifact.WEIGHTS), **load_file(path / artifact.HEADS)}, path / artifact.WEIGHTS)
    (path / artifact.HEADS).unlink()
    return path


@pytest.fixture(scope="session")
def legacy_artifact(tiny_artifact, demo_data, tmp_path_factory):
    dst = tmp_path_factory.mktemp("legacy") / "artifact"
    shutil.copytree(tiny_artifact[0], dst)
    return make_legacy(dst, demo_data)


@pytest.fixture
def legacy_art(legacy_artifact, tmp_path):
    """A copy of the tiny artifact as an older hier wrote it (trained head, prototypes.npy)."""
    dst = tmp_path / "legacy"
    shutil.copytree(legacy_artifact, dst)
    return dst


def write_bomb(path: Path, width=20000, height=10000) -> None:
    """A tiny PNG whose header claims width x height pixels (PIL's decompression-bomb check)."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))


@contextmanager
def served(app, **limits):
    """The app on a real loopback port, in a thread, as ``hier serve`` runs it (``server_config``: its
    connection limits, ``limits`` overriding them); stopped on exit. Start and stop each have a deadline
    (SERVER_DEADLINE s): a server that never comes up, or never stops, fails the test."""
    from hier.serve.server import server_config
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_DEADLINE
    while not server.started:
        assert thread.is_alive(), "server failed to start"
        assert time.monotonic() < deadline, f"server not up after {SERVER_DEADLINE:.0f} s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(SERVER_DEADLINE)
        sock.close()
        assert not thread.is_alive(), f"server still running {SERVER_DEADLINE:.0f} s after it was told to stop"


SERVER_DEADLINE = 60.0


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@contextmanager
def chromium(*flags: str):
    """Headless Debian Chromium through selenium, with the flags this machine's closed network needs
    (and ``flags``)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1000", *flags):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


# --- helpers shared by tests of several packages ----------------------------------------------------------

def one_error_line(code, err) -> bool:
    """Exit 2 and one ``error:`` line, no traceback (a leading blank line left by a progress bar is fine)."""
    return code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1 \
        and "Traceback" not in err


def one_error_line_after_warnings(code, err) -> bool:
    """Exit 2 and one ``error:`` line (after the one-line ``warning:`` an older artifact gets, if any)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:")


def error_line_only(code, err) -> bool:
    """Exit 2 and stderr one ``error:`` line from its first character (nothing before it), no traceback."""
    return code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def ends_in_one_error(code, err) -> bool:
    """Progress lines may come first; then one error line, and no traceback."""
    lines = err.strip().splitlines()
    return code == 2 and lines[-1].startswith("error:") and sum(l.startswith("error:") for l in lines) == 1 \
        and "Traceback" not in err


def tree(folder) -> dict:
    """Every path under ``folder`` with the SHA-256 of its bytes (folders: "dir"), to show nothing changed."""
    return {p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def files_and_modes(path) -> dict:
    """Every file's bytes (temp files included, so a leftover shows), and its mode."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mode) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".hier.lock"}


def full_disk(*args, **kwargs):
    """A writer on a full disk (monkeypatched in for one of the artifact's writers)."""
    raise OSError(errno.ENOSPC, "No space left on device")


def photos_of(demo_data, cls="Cinder_Rook_2019_2023", n=None) -> list[Path]:
    """The drawn training photos of class ``cls``, sorted (the first ``n`` of them if given)."""
    return sorted((demo_data.train_dir / cls).glob("*.jpg"))[:n]


def image_flags(paths) -> list:
    """``--images`` once per photo, as typer takes a list option."""
    return [a for p in paths for a in ("--images", p)]


def plain_photo(path, colour=(200, 30, 30), size=(40, 30)) -> Path:
    """A photo of one colour at ``path`` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def small_dataset(demo_data, root, classes=3, per_class=10) -> Path:
    """A class folder for each of the first ``classes`` drawn classes, ``per_class`` photos each, at ``root``."""
    for c in sorted(p.name for p in demo_data.train_dir.iterdir())[:classes]:
        (root / c).mkdir(parents=True)
        for p in photos_of(demo_data, c)[:per_class]:
            shutil.copy(p, root / c / p.name)
    return root


def enroll_shots(art, demo_data, capsys, *extra, cls="Cinder_Rook_2019_2023", n=5, name="Zephyr_Gale_2025_2025"):
    """``hier enroll ART --class NAME --images DIR EXTRA...``, DIR holding the first ``n`` photos of ``cls``."""
    shot_dir = art.parent / f"shots_{name}_{n}"
    shot_dir.mkdir(exist_ok=True)
    for p in photos_of(demo_data, cls, n):
        shutil.copy(p, shot_dir / p.name)
    return run_cli("enroll", art, "--class", name, "--images", shot_dir, *extra, capsys=capsys)


# an ASCII locale: LC_ALL=C without Python's UTF-8 mode
ASCII = {**{k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}, "PYTHONUTF8": "0", "LC_ALL": "C",
         "LANG": "C"}


def hier_ascii(*args) -> subprocess.CompletedProcess:
    """``python -m hier ARGS`` in a process under the ASCII locale."""
    return subprocess.run([sys.executable, "-m", "hier", *map(str, args)], capture_output=True, env=ASCII)
