"""What the model gives a gallery: listing photos embedded and answered (``embed_listings``), the search
whitening of a new gallery, and the digest of the head that labels its listings (``answers_digest``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from hier import artifact, fileio
from hier.export import artifact_predictor
from hier.gallery.listings import answer_columns
from hier.runtime import Predictor, device

SEARCH_SHRINK = 0.5                    # covariance shrinkage of the search whitening (measured: docs/benchmarks/enroll.md)
PROBES = 64                            # fixed random embeddings whose answers stand for a head (``answers_digest``)


def search_whitening(net) -> np.ndarray | None:
    """The whitening a new gallery of this artifact searches with (None: the trained head serves)."""
    return None if net.statistics is None else net.statistics.whitening(SEARCH_SHRINK)


def answers_digest(net, taxonomy) -> str:
    """A digest of what labels a stored vector: the head's answers (log-probabilities to 3 decimals) on
    ``PROBES`` fixed random unit embeddings, and the taxonomy's classes, models and brands. A gallery
    whose listings were labelled under the artifact's digest of now has current hier_class/brand/model
    columns (filters read them, nothing is labelled again); any change of a head row, offset, temperature
    or class moves the answers, and a digest that differs only costs labelling every listing again."""
    probe = np.random.default_rng(20240917).normal(size=(PROBES, net.cfg.embed_dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    probs = Predictor(net).probs_of(probe)           # the heads alone, as listings are labelled again
    logp = np.round(np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-30)), 3) + 0.0
    h = hashlib.md5(json.dumps([taxonomy.classes, taxonomy.models, taxonomy.brands,
                                taxonomy.fine_to_model.tolist(), taxonomy.fine_to_brand.tolist()]).encode())
    h.update(logp.tobytes())
    return h.hexdigest()


class Embedded(NamedTuple):
    vectors: np.ndarray          # the listing photos' embeddings
    rows: pd.DataFrame           # the listings with hier's predicted class, brand and model
    stamp: tuple                 # the artifact's version they were computed with (``artifact.stamp``)
    whitening: np.ndarray | None  # the artifact's search whitening (``search_whitening``)
    fingerprint: str             # of the weights that embedded them (``HierNet.fingerprint``)
    labels_digest: str           # of the head that labelled them (``answers_digest``)


def embed_listings(artifact_dir: Path, table: pd.DataFrame, progress=None) -> Embedded:
    """The listing photos embedded and answered; only the model's load holds the artifact's lock, the
    embedding runs unlocked."""
    artifact_dir = Path(artifact_dir)
    with fileio.locked(artifact_dir):              # the weights and their export's config, one version
        _, net, taxonomy = artifact.snapshot(artifact_dir, device())
        predictor = artifact_predictor(artifact_dir, net)
        stamp = artifact.stamp(artifact_dir)       # after an export on first use
    out = predictor([Path(p) for p in table["image"]], progress, keep=("embedding", "answer"))
    rows = table.assign(**answer_columns(out["answer"], taxonomy))    # the answer, as `similar --same-brand`
    return Embedded(out["embedding"], rows, stamp, search_whitening(net), net.fingerprint(),
                    answers_digest(net, taxonomy))
