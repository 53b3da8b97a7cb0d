"""The training run's records in an artifact: its settings (``train.json``), validation figures
(``metrics.json``), out-of-fold scores (``oof.npz``) and held-out embeddings (``validation.npz``).

Each has one writer and one reader here, so a format changes in one place.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from hier.artifact.files import METRICS, OOF, TRAIN_RUN, VALIDATION
from hier.fileio import atomic_write, read_json, write_json


def read_run(path: str | Path) -> dict:
    """``train.json`` of the artifact at ``path``: {"model", "train", "data", "merged_classes", ...};
    {} when the artifact has none (built by ``hier ensemble``, or copied without it)."""
    f = Path(path) / TRAIN_RUN
    return read_json(f) if f.is_file() else {}


def write_run(path: str | Path, run: dict) -> None:
    atomic_write(Path(path) / TRAIN_RUN, lambda p: write_json(p, run))


def read_metrics(path: str | Path) -> dict:
    """The validation figures written at the end of training ({} without a validation split)."""
    f = Path(path) / METRICS
    return read_json(f) if f.is_file() else {}


def save_oof(path: Path, paths: list, labels: np.ndarray, logits: np.ndarray, classes: list[str],
             data_dir: str | Path | None = None) -> None:
    """Out-of-fold predictions of a run: the photos' paths, true class indices, the served joint scores
    before the temperature (what the predictor computes, TTA as configured) and the class order. Paths
    below ``data_dir`` are kept relative to it (POSIX), so runs that spelled the folder differently (or
    ran on other machines) name the same photo alike when ``hier ensemble`` matches them."""
    root = Path(os.path.abspath(data_dir)) if data_dir is not None else None

    def key(p) -> str:
        # abspath, not resolve: a photo that is a symlink (a split of linked photos) stays below DATA
        if root is not None and isinstance(p, (str, Path)):
            try:
                return Path(os.path.abspath(p)).relative_to(root).as_posix()
            except ValueError:
                pass
        return str(p)
    with path.open("wb") as f:
        np.savez(f, paths=np.asarray([key(p) for p in paths]), labels=np.asarray(labels, dtype=np.int32),
                 logits=np.asarray(logits, dtype=np.float32), classes=np.asarray(classes))


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """``save_oof``'s arrays: paths, labels, logits, classes (``path``: the ``oof.npz`` file)."""
    with np.load(path) as saved:
        return {k: saved[k] for k in ("paths", "labels", "logits", "classes")}


def has_oof(path: str | Path) -> bool:
    return (Path(path) / OOF).is_file()


def save_validation(path: Path, z: np.ndarray, y: np.ndarray) -> None:
    """Held-out base photos' embeddings (float16) and class indices (``path``: the file)."""
    with path.open("wb") as f:
        np.savez(f, embedding=z.astype(np.float16), label=np.asarray(y, dtype=np.int32))


def read_validation(path: str | Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out base photos of the artifact at ``path`` (embeddings, base class indices); None for
    artifacts trained before them."""
    f = Path(path) / VALIDATION
    if not f.is_file():
        return None
    saved = np.load(f)
    return torch.from_numpy(saved["embedding"].astype(np.float32)), torch.from_numpy(saved["label"].astype(np.int64))
