"""``hier demo``'s data: the synthetic cars (``synthetic``) laid out like the competition's (a folder per
class, a test CSV, a sample submission, a taxonomy), and the demo's own output folder, claimed and marked
so a rerun never deletes what a user put there."""
from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hier import fileio
from hier.data.synthetic import TAXONOMY, _save_jpeg, draw_car
from hier.errors import HierError
from hier.outputs import make_folder, writable_folder
from hier.version import __version__


@dataclass(frozen=True)
class DemoData:
    """Paths of a generated demo dataset, laid out like the competition data."""

    root: Path
    train_dir: Path
    test_csv: Path
    test_labels: Path
    sample_submission: Path
    taxonomy: Path
    classes: list[str]


def make_demo_dataset(
    root: Path,
    images_per_class: int = 40,
    test_images_per_class: int = 8,
    img_size: int = 128,
    seed: int = 0,
) -> DemoData:
    """Generate the demo dataset under ``root`` and return its paths.

    ``root`` must not exist or be an empty directory: we never overwrite a
    user's files.  Each image uses its own RNG derived from (seed, split, class,
    index), so output is byte-identical for a given seed regardless of order.
    """
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory; choose another demo root")
        if any(root.iterdir()):
            raise FileExistsError(
                f"{root} is not empty; refusing to write the demo dataset there "
                "(pick an empty or non-existent directory, or delete it first)"
            )
    if images_per_class < 1 or test_images_per_class < 0 or img_size < 16:
        raise ValueError("need images_per_class >= 1, test_images_per_class >= 0, img_size >= 16")

    train_dir = root / "train"
    test_dir = root / "test"
    train_dir.mkdir(parents=True, exist_ok=True)
    test_dir.mkdir(exist_ok=True)
    classes = [row[0] for row in TAXONOMY]

    for ci, (cls, brand, model, y0, _y1) in enumerate(TAXONOMY):
        cdir = train_dir / cls
        cdir.mkdir()
        for i in range(images_per_class):
            rng = np.random.default_rng([seed, 0, ci, i])
            _save_jpeg(draw_car(rng, brand, model, y0, img_size), cdir / f"{cls}_{i:04d}.jpg")

    # Test split: same distribution, shuffled so order leaks no labels.
    items = [(ci, i) for ci in range(len(TAXONOMY)) for i in range(test_images_per_class)]
    order = np.random.default_rng([seed, 2]).permutation(len(items))
    test_rows: list[tuple[str, str]] = []
    for n, k in enumerate(order):
        ci, i = items[int(k)]
        cls, brand, model, y0, _y1 = TAXONOMY[ci]
        rng = np.random.default_rng([seed, 1, ci, i])
        tid = f"TEST_{n:05d}"
        _save_jpeg(draw_car(rng, brand, model, y0, img_size), test_dir / f"{tid}.jpg")
        test_rows.append((tid, cls))

    test_csv = root / "test.csv"
    with test_csv.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "img_path"])
        w.writerows((tid, f"./test/{tid}.jpg") for tid, _ in test_rows)

    test_labels = root / "test_labels.csv"
    with test_labels.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "class"])
        w.writerows(test_rows)

    # BOM on purpose: the competition's sample file has one, and readers must cope.
    sample_submission = root / "sample_submission.csv"
    p = repr(1.0 / len(classes))
    with sample_submission.open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", *classes])
        w.writerows([tid, *([p] * len(classes))] for tid, _ in test_rows)

    taxonomy = root / "taxonomy.csv"
    with taxonomy.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["class", "brand", "model", "year_start", "year_end"])
        w.writerows(TAXONOMY)

    return DemoData(
        root=root,
        train_dir=train_dir,
        test_csv=test_csv,
        test_labels=test_labels,
        sample_submission=sample_submission,
        taxonomy=taxonomy,
        classes=classes,
    )


# --- the folder of a ``hier demo`` run -----------------------------------------------------------------
DEMO_MARKER = ".hier-demo"
DEMO_PARTS = ("data", "eval", "artifact", "submission.csv")     # everything a demo run writes


@contextmanager
def demo_folder(out: Path) -> Iterator[bool]:
    """Hold ``out`` for one ``hier demo`` run, marked unfinished until the body ends without an error.

    Yields True when ``out`` held an unfinished earlier run (only the demo's own parts and marker), which is
    cleared so a failed or interrupted run can simply be run again.

    Raises:
        HierError: ``out`` is a file, holds anything the demo did not write or a finished demo (nothing
            written there), or another demo run holds it (its lock, ``fileio.LOCK``).
    """
    out = Path(out)
    _unfinished_or_empty(out)                      # refused before anything is written into a user's folder
    make_folder(out, out)
    writable_folder(out, out)                      # a read-only volume: one line, not a traceback at the marker
    with ExitStack() as held:
        try:
            held.enter_context(fileio.locked(out, timeout=0))
        except fileio.Busy:
            raise HierError(f"{out} is being written by another hier demo run; wait for it to end or choose "
                            "another --out") from None
        started_over = _unfinished_or_empty(out)       # again, now that no other demo run can change it
        if started_over:
            for name in DEMO_PARTS:
                part = out / name
                if part.is_dir() and not part.is_symlink():
                    shutil.rmtree(part)
                else:
                    part.unlink(missing_ok=True)
        _mark(out, finished=False)
        yield started_over
        _mark(out, finished=True)


def _unfinished_or_empty(out: Path) -> bool:
    """True: ``out`` holds an unfinished demo run; False: it is empty or absent; else HierError."""
    if out.exists() and not out.is_dir():
        raise HierError(f"--out {out} is a file, not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir() if p.name != fileio.LOCK) if out.is_dir() else []
    if not entries:
        return False
    try:
        unfinished = json.loads((out / DEMO_MARKER).read_text(encoding="utf-8"))["finished"] is False
    except (OSError, ValueError, KeyError, TypeError):
        raise HierError(f"{out} is not empty; choose another --out") from None
    if not unfinished:
        raise HierError(f"{out} holds a finished demo; choose another --out")
    other = [name for name in entries if name not in (DEMO_MARKER, *DEMO_PARTS)]
    if other:
        raise HierError(f"{out} holds an unfinished demo but also {other[0]!r}, which the demo did not write; "
                        "move it out or choose another --out")
    return True


def _mark(out: Path, finished: bool) -> None:
    (out / DEMO_MARKER).write_text(json.dumps({"hier": __version__, "finished": finished}), encoding="utf-8")
