"""Competition submissions, per-image top-k answers and ensembles of probability matrices."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_softmax

from hier.artifact import atomic_write
from hier.errors import HierError
from hier.taxonomy import Taxonomy, nfc

EPS = 1e-6   # submission floor: log loss punishes a confident 0 without limit


def write_submission(probs: np.ndarray, ids: list[str], taxonomy: Taxonomy, sample: str | Path,
                     out: str | Path) -> pd.DataFrame:
    """Probabilities in the sample file's column and row order, floored at EPS and renormalised to sum
    to 1, written with the sample's encoding (the Hecto file is UTF-8 with BOM)."""
    sample = Path(sample)
    if not sample.is_file():
        raise HierError(f"sample submission not found: {sample}")
    bom = sample.read_bytes()[:3] == b"\xef\xbb\xbf"
    header = pd.read_csv(sample, nrows=0, encoding="utf-8-sig").columns.tolist()
    id_col, columns = header[0], header[1:]
    unknown = [c for c in columns if c not in taxonomy]
    missing = [c for c in taxonomy.classes if c not in set(map(nfc, columns))]
    if unknown or missing:
        what = f"column {unknown[0]!r} is not a class of the artifact" if unknown else \
            f"class {missing[0]!r} of the artifact has no column"
        raise HierError(f"{sample} does not match the artifact: {what} "
                        f"({len(unknown)} unknown, {len(missing)} missing)")
    sample_ids = pd.read_csv(sample, usecols=[0], dtype=str, encoding="utf-8-sig")[id_col].tolist()
    if sorted(sample_ids) != sorted(ids):
        raise HierError(f"the test images' IDs do not match the {len(sample_ids)} IDs of {sample}")
    order = [taxonomy.class_index[nfc(c)] for c in columns]
    row = {i: n for n, i in enumerate(ids)}
    p = probs[[row[i] for i in sample_ids]][:, order].astype(np.float64)
    p = np.clip(p, EPS, 1.0)
    p = p / p.sum(1, keepdims=True)
    table = pd.DataFrame(p, columns=columns)
    table.insert(0, id_col, sample_ids)
    atomic_write(out, lambda tmp: table.to_csv(tmp, index=False, encoding="utf-8-sig" if bom else "utf-8"))
    return table


def top_k(probs: np.ndarray, taxonomy: Taxonomy, paths: list, k: int = 5) -> pd.DataFrame:
    """One row per (image, rank): class, brand, model, years, P(class) and its P(model), P(brand)."""
    model_p, brand_p = taxonomy.marginals(probs)
    rows = []
    for i, path in enumerate(paths):
        for rank, c in enumerate(np.argsort(-probs[i])[:k], 1):
            r = taxonomy.row(taxonomy.classes[c])
            m, b = taxonomy.fine_to_model[c], taxonomy.fine_to_brand[c]
            rows.append({"image": str(path), "rank": rank, "class": r["class"], "brand": r["brand"],
                         "model": r["model"], "years": taxonomy.years(r["class"]),
                         "p": float(probs[i, c]), "p_model": float(model_p[i, m]), "p_brand": float(brand_p[i, b])})
    return pd.DataFrame(rows)


def geometric_mean(prob_list: list[np.ndarray]) -> np.ndarray:
    """Ensemble of probability matrices as a normalised geometric mean (mean of log-probabilities)."""
    logp = np.mean([np.log(np.clip(p, 1e-12, 1)) for p in prob_list], axis=0)
    return np.exp(log_softmax(logp, axis=1))
