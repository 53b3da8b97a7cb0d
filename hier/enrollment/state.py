"""Enrollment's state in an artifact (config.json's "enrolled" entries, the class statistics, or the
trained head's shot sums and replaced rows), its reports, and the shots counted by content."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hier import artifact, fileio
from hier.artifact.files import ENROLLED, STATISTICS, TRAINED_ROWS
from hier.data import image_files
from hier.errors import HierError
from hier.models import HierNet
from hier.taxonomy import Taxonomy

OWN_SHOTS = 0.5                 # a class answered on fewer of its own shots than this is told how to do better


class _Report:
    def to_dict(self) -> dict:
        """As the service returns it: ``name`` under the key ``class``, first."""
        d = asdict(self)
        return {"class": d.pop("name"), **d}


@dataclass(frozen=True)
class Enrolled(_Report):
    """What one ``enroll`` did: the CLI words it, the service returns ``to_dict()``."""

    name: str
    head: str                          # "statistics" or "trained": the head that scores the class
    mapped: bool                       # trained head only: shots mapped through the prototypes (else raw)
    base: bool                         # the shots went to a class the artifact was trained on
    new: bool                          # a class that did not exist before
    calibrated: bool                   # its offset was fitted on the artifact's validation photos
    duplicates: int                    # photos given twice, or already among its shots: dropped
    added: int                         # shots added now (0: every photo was one already)
    total: int                         # its shots in all
    classes: int                       # classes of the artifact after it
    offset: float | None = None        # its score offset (positive: lowered to keep the base-drop budget)
    own_shots_answered: float | None = None   # share of its own shots answered as it
    offset_cost: float | None = None   # share of its own shots the offset costs it
    near_duplicate: dict | None = None  # {"class", "similarity"} of a base class it looks like
    base_photos_taken: float | None = None   # share of the held-out base photos now answered as it
    taken_most_from: dict | None = None      # {"class", "photos", "of", "share"}: the base class most of them are
    base_accuracy_before: float | None = None  # held-out base photos answered right before the change ...
    base_accuracy_after: float | None = None   # ... and after it (every changed answer, brand sums included)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "summary": self.summary()}

    def summary(self) -> str:
        """What the enrollment means for the answers, in words (the CLI prints it, the service returns it):
        how many of the photos given are answered as the class, and how many of the known classes' held-out
        photos are now answered as it, both by the answer ``hier predict`` gives."""
        dropped = f"; {self.duplicates} duplicate photo(s) dropped" if self.duplicates else ""
        if not self.added:
            return f"added nothing to {self.name!r}: every photo given is already one of its {self.total} shot(s)"
        if self.base:
            words = [f"added {self.added} shot(s) to base class {self.name!r} ({self.total} in all{dropped}; "
                     f"`hier unenroll --class {self.name!r}` takes them back out)."]
        else:
            words = [(f"enrolled {self.name!r} from {self.added} shot(s)" if self.new else
                      f"added {self.added} shot(s) to {self.name!r} ({self.total} in all)") + f"{dropped}; "
                     f"{self.classes} classes now."]
        if self.own_shots_answered is not None:
            words.append(f"{round(self.own_shots_answered * self.added)} of these {self.added} photo(s) are answered "
                         f"as {self.name!r}.")
            if self.own_shots_answered < OWN_SHOTS and not self.near_duplicate:
                words.append("More (and more varied) photos of it make it stronger" + (
                    f"; a larger budget (max_base_drop) lets it take more, its offset costs it {self.offset_cost:.0%} "
                    "of these" if self.offset_cost else "") + ".")
        if self.base_accuracy_before is not None and self.base_accuracy_after is not None:
            words.append(f"The known classes' held-out photos are answered right {self.base_accuracy_after:.1%} of "
                         f"the time (before: {self.base_accuracy_before:.1%}).")
        if self.base:
            return " ".join(words)
        most = self.taken_most_from
        if self.base_photos_taken:
            words.append(f"Of the known classes' held-out photos, {self.base_photos_taken:.1%} are now answered as "
                         f"{self.name!r}" + (f", most of them photos of {most['class']!r} ({most['photos']} of its "
                                             f"{most['of']})" if most else "") + ".")
        elif self.base_photos_taken == 0:
            words.append(f"None of the known classes' held-out photos is answered as {self.name!r}.")
        return " ".join(words)


@dataclass(frozen=True)
class Unenrolled(_Report):
    name: str
    classes: int                       # classes of the artifact after it
    base: bool                         # a base class's added shots were removed (the class stays)


def enrolled_state(path: Path, stats) -> tuple[list[dict], np.ndarray | None, np.ndarray | None]:
    """Enrolled entries (config.json: class, shots, their MD5s, offset, whether it is a base class) and,
    for an artifact served by its trained head (``stats`` None), their shot sums and, for shots added to
    base classes, the trained rows they replaced (so ``unenroll`` restores them exactly). Class
    statistics hold the shots themselves."""
    entries = artifact.read_config(path).get("enrolled", [])
    if stats is not None:
        return entries, None, None
    sums = np.load(path / ENROLLED) if entries else None
    trained = np.load(path / TRAINED_ROWS) if any(e.get("base") for e in entries) else None
    return entries, sums, trained


def usable_statistics(path: Path, net: HierNet):
    """The statistics enrollment updates; None for an artifact served by its trained head. One meant to
    be served by statistics whose statistics are missing or stale is refused: enrolling into it would
    mix the two heads."""
    if net.cfg.head == "statistics" and net.statistics is None:
        raise HierError(f"{path} has no up-to-date class statistics ({STATISTICS}: a training run that has not "
                        "finished?); finish it with `hier train --resume` before enrolling")
    return net.statistics


def save_state(path: Path, net: HierNet, taxonomy: Taxonomy, entries: list[dict], sums: np.ndarray | None,
          trained: np.ndarray | None, stats=None) -> None:
    """Save heads, taxonomy and enrollment state (the class statistics, or for an artifact served by its
    trained head the shot sums and trained rows); a nan or inf anywhere in them (a score offset, a row)
    would poison every later answer and enrollment, so it is refused here whatever produced it (the
    statistics refuse their own in ``ClassStatistics.save``)."""
    finite = all(math.isfinite(e.get("offset") or 0.0) for e in entries) and all(
        bool(torch.isfinite(h.weight).all()) for h in (net.fine, net.model, net.brand)) and all(
        a is None or bool(np.isfinite(a).all()) for a in (sums, trained))
    if not finite:
        raise HierError(f"refusing to save {path}: enrollment produced a value that is not a finite number; "
                        "the artifact is unchanged")
    if stats is not None:
        artifact.save(path, net, taxonomy, extra={"enrolled": entries}, files={STATISTICS: stats.save})
        return
    files = {ENROLLED: lambda p: fileio.save_npy(p, sums)} if entries else {}
    if any(e.get("base") for e in entries):
        files[TRAINED_ROWS] = lambda p: fileio.save_npy(p, trained)
    artifact.save(path, net, taxonomy, extra={"enrolled": entries}, files=files,
                  remove=tuple(sorted({ENROLLED, TRAINED_ROWS} - set(files))))


class Shot(NamedTuple):
    """A shot already in memory (an upload): its decoded photo and the MD5 of its file's bytes, so it is
    counted by content exactly as the CLI counts the same file."""

    image: np.ndarray
    md5: str


def distinct_shots(images: list) -> tuple[list, list[str], int]:
    """The shots, one per distinct content (MD5 of the file's bytes: three copies of a photo are one
    shot), their digests, and how many copies were dropped. ``images``: paths and folders (checked, a
    broken shot refused, never skipped), or ``Shot``s."""
    given = [x for x in images if isinstance(x, Shot)]
    if given and len(given) != len(images):
        raise HierError("give the shots as paths or as uploads, not both")
    items = [(s.md5, s.image) for s in given] or [(fileio.file_md5(p), Path(p))
                                                  for p in image_files(images, strict=True).paths]
    first: dict[str, object] = {}
    for digest, shot in items:
        first.setdefault(digest, shot)
    return list(first.values()), list(first), len(items) - len(first)
