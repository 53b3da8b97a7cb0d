"""The 2025 Hecto used-car challenge (Dacon): its submission file and the class pairs it scores as one.

A submission is one row per test ID in the sample file's row order, one column per class in its column
order, probabilities floored at ``EPS`` (log loss punishes a confident 0 without limit) and written in
the sample's encoding (UTF-8 with BOM). The organiser scores five pairs of classes as one
(``registry/hecto2025_equivalent.csv``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hier.data import read_table, require_cells
from hier.errors import HierError
from hier.fileio import atomic_write
from hier.taxonomy import Taxonomy, nfc

EPS = 1e-6   # submission floor: log loss punishes a confident 0 without limit


@dataclass(frozen=True)
class Sample:
    """What writing a submission needs from the sample file, checked (``read_sample``): its ID column's
    name, its class columns and its IDs in its order, and its encoding (the answer is written alike)."""

    path: Path
    id_col: str
    columns: list[str]
    ids: list[str]
    encoding: str


def read_sample(sample: str | Path | Sample, ids: list[str], taxonomy: Taxonomy,
                merged: dict[str, str] | None = None) -> Sample:
    """The sample submission, checked against the test IDs and the artifact's classes *before* any
    photo is predicted: one error line for a file that cannot be read (``read_table``), a class column
    the artifact lacks or the other way round, or IDs other than the test CSV's. A ``Sample`` read
    before is checked again (against a taxonomy that may have changed since), not read again.
    ``merged``: columns the artifact learned as another class (``hier train --merge-classes``)."""
    merged = merged or {}
    if not isinstance(sample, Sample):
        path = Path(sample)
        table = read_table(path, "sample submission", usecols=[0])      # the IDs; the classes are its header
        require_cells(table, [table.columns[0]], path)
        header = table.attrs["header"]
        sample = Sample(path, header[0], header[1:], table.iloc[:, 0].tolist(), table.attrs["encoding"])
    unknown = [c for c in sample.columns if c not in taxonomy and nfc(c) not in merged]
    missing = [c for c in taxonomy.classes if c not in set(map(nfc, sample.columns))]
    if unknown or missing:
        what = f"column {unknown[0]!r} is not a class of the artifact" if unknown else \
            f"class {missing[0]!r} of the artifact has no column"
        raise HierError(f"{sample.path} does not match the artifact: {what} "
                        f"({len(unknown)} unknown, {len(missing)} missing)")
    if sorted(sample.ids) != sorted(ids):
        extra, absent = sorted(set(sample.ids) - set(ids)), sorted(set(ids) - set(sample.ids))
        example = (f"e.g. {extra[0]!r} is only in the sample" if extra else
                   f"e.g. {absent[0]!r} is only in the test CSV" if absent else "an ID repeats")
        raise HierError(f"the {len(ids)} test images' IDs do not match the {len(sample.ids)} IDs of {sample.path} "
                        f"({example})")
    return sample


def write_submission(probs: np.ndarray, ids: list[str], taxonomy: Taxonomy, sample: str | Path | Sample,
                     out: str | Path, merged: dict[str, str] | None = None) -> pd.DataFrame:
    """Probabilities in the sample file's column and row order, floored at EPS and renormalised to sum
    to 1, written with the sample's encoding (the Hecto file is UTF-8 with BOM). ``sample``: its path, or
    ``read_sample``'s result, read before predicting (checked again against ``taxonomy``, the one the
    probabilities came with, in case the artifact changed meanwhile). A class trained merged with its
    equivalents (``merged``: column -> the class it was learned as) has its probability split evenly
    between their columns: the organiser scores them as one, so the sum is what counts."""
    merged = merged or {}
    sample = read_sample(sample, ids, taxonomy, merged)
    learned = [merged.get(nfc(c), nfc(c)) for c in sample.columns]
    order = [taxonomy.class_index[c] for c in learned]
    shares = pd.Series(learned).map(pd.Series(learned).value_counts()).to_numpy()
    row = {i: n for n, i in enumerate(ids)}
    p = probs[[row[i] for i in sample.ids]][:, order].astype(np.float64) / shares
    p = np.clip(p, EPS, 1.0)
    p = p / p.sum(1, keepdims=True)
    table = pd.DataFrame(p, columns=sample.columns)
    table.insert(0, sample.id_col, sample.ids)
    atomic_write(out, lambda tmp: table.to_csv(tmp, index=False, encoding=sample.encoding))
    return table
