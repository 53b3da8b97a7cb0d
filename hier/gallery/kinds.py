"""Index kinds: which FAISS index a gallery of n listings is (``KINDS``, ``factory_string``), what its
training needs and takes, and its searches' defaults."""
from __future__ import annotations

import numpy as np

from hier.errors import HierError

KINDS = ("flat", "ivf", "hnsw", "pq")
# Searches' defaults per kind (each call may give its own): nprobe of the IVF kinds, efSearch of HNSW;
# pq's from scripts/bench_gallery.py (docs/benchmarks/gallery.md: re-ranked, Recall@10 is level over nprobe).
NPROBE = {"ivf": 16, "pq": 16}
EF_SEARCH = 64
# pq: one 6-bit code per 4 dimensions (256-d: 48 bytes + 8 of id; docs/benchmarks/gallery.md)
PQ_DIMS, PQ_BITS = 4, 6
PQ_MIN = 39 * 2 ** PQ_BITS             # pq trains 64 centroids per sub-quantizer: FAISS asks 39 points each
TRAIN_PER_LIST, TRAIN_MIN = 50, 100_000  # IVF training sample: 50 vectors per list, at least 100k (or all)


def lists(n: int) -> int:
    """IVF lists for n vectors: 4 * sqrt(n), at most 4096, at least 39 training points per list (FAISS's
    minimum)."""
    return max(1, min(4096, int(4 * np.sqrt(n)), n // 39))


def factory_string(kind: str, n: int, d: int = 256) -> str:
    """FAISS ``index_factory`` string for n vectors of d dimensions: exact flat search by default, IVF or
    HNSW for large galleries, pq (an IVF of product-quantised residuals, ``PQ_BITS`` bits per
    ``PQ_DIMS`` dimensions) for millions."""
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "ivf":
        return f"IVF{lists(n)},Flat"
    if kind == "hnsw":
        return "IDMap2,HNSW32"
    if kind == "pq":
        # chosen by scripts/bench_gallery.py among codes of at most 64 bytes a listing
        # (docs/benchmarks/gallery.md): an OPQ rotation + 8-bit PQ48 found more of the exact top 10 but trains
        # longer; "np": no polysemous training (hier never searches by Hamming distance, and it costs minutes)
        m = next(m for m in range(max(1, d // PQ_DIMS), 0, -1) if d % m == 0)
        return f"IVF{lists(n)},PQ{m}x{PQ_BITS}np"
    raise HierError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


def check_size(kind: str, n: int) -> None:
    """One line when n listing images are too few to train an index of ``kind``: IVF needs a vector per
    list, pq ``PQ_MIN`` (FAISS's 39 training points per centroid of its sub-quantizers)."""
    need = PQ_MIN if kind == "pq" else lists(n) if kind == "ivf" else 0
    if n < need:
        raise HierError(f"--index {kind} needs at least {need:,} listing images to train, not {n:,}; use flat")


def training_sample(vectors: np.ndarray, n_lists: int, seed: int = 0) -> np.ndarray:
    """The vectors an IVF index trains on: a seeded random sample of ``max(TRAIN_MIN, TRAIN_PER_LIST *
    lists)`` (all of them when fewer); k-means on more costs time and moves the centroids little."""
    size = max(TRAIN_MIN, TRAIN_PER_LIST * n_lists)
    if len(vectors) <= size:
        return vectors
    pick = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.ascontiguousarray(vectors[pick])
