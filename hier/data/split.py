"""The training split: which photos a run learns from and which it is measured on.

``training_split`` is the one definition, used by ``hier train`` (and ``--resume``), the out-of-fold
scores, and the int8 calibration of ``hier export``: read the layout, drop the exclude list, learn the
equivalent class pairs as one (``--merge-classes``), crop the cars, and split by class (a seeded
hold-out, or fold ``fold`` of ``folds``). A copy of these steps drifted once: int8 calibration skipped
the merge and refused every ``--merge-classes`` artifact.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from hier.data.detect import CarDetector
from hier.data.exclude import apply_exclude, exclude_keys, exclude_names
from hier.data.files import ImageSet, require_cells
from hier.data.readers import create_reader
from hier.data.tables import read_table
from hier.errors import HierError
from hier.taxonomy import Taxonomy, nfc, registry_file


@dataclass(frozen=True)
class SplitSettings:
    """The settings of ``hier train`` that decide its photos and their split (a subset of
    ``TrainConfig``; ``from_run`` reads them back from a run's ``train.json``)."""

    layout: str = "auto"
    exclude: str | None = None
    merge_classes: str | None = None
    crop: str = "none"
    detector: str | None = None
    val_frac: float = 0.2
    seed: int = 0
    fold: int | None = None
    folds: int = 5
    exclude_names: tuple[str, ...] | None = None   # the list as the run read it (train.json): used, not the file

    @classmethod
    def of(cls, settings, run: dict | None = None) -> "SplitSettings":
        """The split settings of any object or dict holding them (a ``TrainConfig``, ``train.json``'s
        "train"); absent ones take their defaults. ``run``: a run's ``train.json``, whose recorded exclude
        list is the run's own (the file may have been edited since)."""
        get = settings.get if isinstance(settings, dict) else lambda k, d: getattr(settings, k, d)
        found = cls(**{f.name: get(f.name, f.default) for f in fields(cls)})
        recorded = (run or {}).get("exclude_names")
        return found if recorded is None else replace(found, exclude_names=tuple(recorded))


@dataclass
class TrainingSplit:
    """The photos of a run, their classes, and which are trained on (``train``) and validated on (``val``),
    as indices into ``paths``; ``taxonomy`` narrowed to the classes with photos; ``merged``: {class learned
    as another: that class}; ``unmerged``: pairs not merged (a side without photos); ``absent``: exclude-list
    names not among the photos; ``crop_fallback``: the share of photos with no car box (used whole)."""

    images: ImageSet
    taxonomy: Taxonomy
    train: np.ndarray
    val: np.ndarray
    merged: dict[str, str]
    unmerged: int = 0
    excluded: int = 0
    absent: int = 0
    crop_fallback: float | None = None

    @property
    def paths(self) -> list:
        return self.images.paths

    @property
    def labels(self) -> list[str]:
        return self.images.labels

    def part(self, which: str) -> tuple[list, list[str]]:
        """(photos, class names) of ``train`` or ``val``."""
        idx = getattr(self, which)
        return [self.paths[i] for i in idx], [self.labels[i] for i in idx]


def training_split(data_dir: str | Path, taxonomy: Taxonomy | None, settings, own_data: bool = True,
                   detector: CarDetector | None = None, required: list[str] | None = None) -> TrainingSplit:
    """The photos of ``data_dir`` and their split, as ``hier train`` makes it (see the module).

    Args:
        data_dir: a labelled dataset (``hier.data.readers`` layouts).
        taxonomy: the classes the run may learn (None: the layout's own, else parsed folder names).
        settings: ``SplitSettings`` or anything ``SplitSettings.of`` reads (a ``TrainConfig``, a dict).
        own_data: ``data_dir`` is the run's own data, so ``settings.exclude`` applies (False: other photos).
        detector: the car detector to crop with (default: one made from the settings when ``crop`` is yolo).
        required: classes that must have photos (a resumed run's), checked before the costly crop pass.

    Returns:
        A ``TrainingSplit``.

    Raises:
        HierError: a class of the data not in ``taxonomy``, a class the exclude list leaves without photos,
            a required class without photos, a split the class counts cannot make, a bad exclude or pairs
            file.
    """
    s = settings if isinstance(settings, SplitSettings) else SplitSettings.of(settings)
    if detector is None and s.crop == "yolo":
        detector = CarDetector(s.detector)           # a bad path fails before any work
    images, implied = create_reader(data_dir, s.layout)()
    merged, unmerged = merge_classes(images, s.merge_classes) if s.merge_classes else ({}, 0)
    names = sorted(set(images.labels))
    taxonomy = taxonomy or implied
    if taxonomy is not None:
        unknown = [c for c in names if c not in taxonomy]
        if unknown:
            raise HierError(f"class {unknown[0]!r} is in the data but not in the taxonomy "
                            f"({len(unknown)} such classes)")
    excluded = absent = 0
    if s.exclude and own_data:
        before = len(images.paths)
        listed = list(s.exclude_names) if s.exclude_names is not None else exclude_names(s.exclude)
        images, absent = apply_exclude(images, exclude_keys(listed, data_dir))
        excluded = before - len(images.paths)
        emptied = sorted(set(names) - set(images.labels))
        if emptied:                          # refused now, not after a whole run that cannot serve it
            raise HierError(f"--exclude {s.exclude} leaves class {emptied[0]!r} without photos ({len(emptied)} "
                            "such classes); keep some of its photos, or take its folder out of the data")
    present = set(images.labels)                # the set once, not once per class asked about
    missing = [c for c in required or () if c not in present]
    if missing:
        raise HierError(f"{len(missing)} of the run's {len(required)} classes have no photos in {data_dir} "
                        f"(e.g. {missing[0]!r}); resume with the data the run was trained on")
    taxonomy = Taxonomy.from_class_names(names) if taxonomy is None else \
        taxonomy.subset([c for c in taxonomy.classes if c in present])
    fallback = None
    if detector is not None:
        images.paths, fallback = detector.crops(images.paths)
    tr, va = split_indices(images.labels, s.val_frac, s.seed, s.fold, s.folds)
    return TrainingSplit(images, taxonomy, np.asarray(tr), np.asarray(va), merged, unmerged, excluded, absent,
                         fallback)


def load_equivalent_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Pairs the organiser scores as one class (a CSV, or the name of one shipped with hier:
    ``hecto2025_equivalent``); ``hier train --merge-classes`` learns each pair as its first class."""
    path = registry_file(path)
    table = read_table(path, "class-pairs CSV", ["class_a", "class_b"])
    require_cells(table, ["class_a", "class_b"], path)
    return list(zip(table["class_a"].map(nfc), table["class_b"].map(nfc)))


def merge_classes(images: ImageSet, pairs_csv: str) -> tuple[dict[str, str], int]:
    """Relabel the photos of each pair's second class as its first (both must have photos; a pair with
    one side absent is nothing to merge). Returns {merged class: class it is learned as} and how many
    pairs were not merged (a class without photos here: another competition's file, or a typo)."""
    present = set(images.labels)
    pairs = load_equivalent_pairs(pairs_csv)
    merged = {b: a for a, b in pairs if a in present and b in present and a != b}
    if set(merged) & set(merged.values()):
        raise HierError(f"{pairs_csv}: a class is merged into one and another into it; list each group once")
    images.labels = [merged.get(c, c) for c in images.labels]
    return merged, len(pairs) - len(merged)


def split_indices(labels: list[str], val_frac: float = 0.2, seed: int = 0,
                  fold: int | None = None, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices: a seeded hold-out split, or fold ``fold`` of ``folds`` (k-fold)."""
    idx = np.arange(len(labels))
    counts = pd.Series(labels).value_counts()
    if fold is not None:
        if not 0 <= fold < folds:
            raise HierError(f"--fold must be in 0..{folds - 1}")
        if counts.min() < folds:
            raise HierError(f"class {counts.idxmin()!r} has {counts.min()} photo(s); --folds {folds} needs "
                            f"at least {folds} per class")
        from sklearn.model_selection import StratifiedKFold  # here: predicting needs no scikit-learn
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(skf.split(idx, labels))[fold]
    if val_frac <= 0:
        return idx, idx[:0]
    if counts.min() < 2:
        raise HierError(f"class {counts.idxmin()!r} has one photo; a validation split needs two or more per "
                        "class (or pass --val-frac 0)")
    n_val = int(np.ceil(val_frac * len(labels)))
    if n_val < len(counts) or len(labels) - n_val < len(counts):
        raise HierError(f"--val-frac {val_frac} of {len(labels)} photos gives {n_val} validation and "
                        f"{len(labels) - n_val} training photos for {len(counts)} classes; each side needs "
                        "one per class (change --val-frac, or 0 for no validation)")
    from sklearn.model_selection import train_test_split
    return train_test_split(idx, test_size=val_frac, stratify=labels, random_state=seed)
