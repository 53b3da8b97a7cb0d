"""Searching a gallery: one FAISS search over every read shard with per-call parameters, restricted by an
ID selector, on the GPU copy when there is one, and the pq kind's exact re-rank of its candidates.
``Gallery.search`` is ``search`` here; these functions read the gallery's shards and caches."""
from __future__ import annotations

import faiss
import numpy as np

from hier.artifact.files import VECTORS
from hier.errors import HierError
from hier.gallery.introspect import ivf_of, search_parameters
from hier.gallery.listings import ID

# pq: the codes find k x RERANK candidates, which the listings' vectors as searched, kept beside the index
# as float16 (``VECTORS``, memory-mapped: read for the candidates only), re-rank exactly (recall and latency
# by depth: docs/benchmarks/gallery.md, re-ranking).
RERANK = 50
GPU_MAX_K = 2048                       # the most neighbours FAISS's GPU indexes return per query


def search(gallery, queries: np.ndarray, k: int = 10, nprobe: int | None = None, ef_search: int | None = None,
           allowed: np.ndarray | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, FAISS ids), each (n_queries, k); id -1 where fewer than k vectors (of those
    ``allowed``) exist. ``nprobe`` (IVF kinds) and ``ef_search`` (HNSW) hold for this call only
    (default: the gallery's ``nprobe`` / ``ef_search``), passed as FAISS ``SearchParameters`` (which
    ``IndexShards`` hands to every shard), so searches at once with different settings do not
    meddle; ``allowed``: FAISS ids the search is restricted to (an ``IDSelectorBitmap`` inside the
    one search); ``rerank``: pq's candidates per answer wanted (default ``RERANK``), as FAISS's
    ``k_factor``. On the GPUs (``on_gpus``) nprobe is set on the GPU copy and ``allowed`` is refused
    (FAISS's GPU indexes take no selector)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if rerank is not None and (not isinstance(rerank, (int, np.integer)) or rerank < 1):
        raise HierError(f"rerank must be a whole number of at least 1, not {rerank!r}")
    if reranks(gallery):
        deep = max(k, min(k * (rerank or RERANK), sum(s.index.ntotal for s in gallery.loaded())))
        _, candidates = codes_search(gallery, queries, deep, nprobe, ef_search, allowed)
        return reranked(gallery, queries, candidates, k)
    return codes_search(gallery, queries, k, nprobe, ef_search, allowed)


def codes_search(gallery, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None,
                 allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS search of the gallery's index as it stores its vectors (the pq kind: by its codes
    alone, no re-rank)."""
    if gallery.gpu is not None:
        if allowed is not None:
            raise HierError("a search restricted to some listings runs on the CPU index, not the GPUs")
        if ivf_of(gallery.loaded()[0].index) is not None:
            faiss.GpuParameterSpace().set_index_parameter(gallery.gpu, "nprobe", int(nprobe or gallery.nprobe))
        return gallery.gpu.search(queries, min(k, GPU_MAX_K))
    keep: list = []
    sel = None
    if allowed is not None:
        # a bitmap over the ids (FAISS's IDSelectorBitmap): far cheaper to build than an IDSelectorBatch's
        # hash set for a large allowed set
        allowed = np.asarray(allowed, dtype=np.int64)
        bits = np.zeros(int(allowed.max()) + 1 if len(allowed) else 1, dtype=bool)
        bits[allowed] = True
        bitmap = np.packbits(bits, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        keep.append(bitmap)
    # every shard has the one structure: the first one's parameters fit them all
    params = search_parameters(gallery.loaded()[0].index, keep, nprobe or gallery.nprobe,
                               ef_search or gallery.ef_search, sel)
    return gallery.index.search(queries, k, params=params)


def reranks(gallery) -> bool:
    """Whether searches re-rank (``RERANK``): every read shard keeps its re-rank vectors."""
    loaded = gallery.loaded()
    return bool(loaded) and all(s.exact is not None for s in loaded)


def reranked(gallery, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's ``candidates`` by their exact similarity (the re-rank vectors), as
    FAISS answers: (similarities, ids), -1 ids (and FAISS's lowest similarity) where fewer exist."""
    sims = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    q = gallery.searched(queries)
    for i, row in enumerate(candidates):
        found = np.unique(row[row >= 0])
        s = exact_of(gallery, found) @ q[i]
        best = np.argsort(-s, kind="stable")[:k]
        sims[i, :len(best)], ids[i, :len(best)] = s[best], found[best]
    return sims, ids


def exact_of(gallery, ids: np.ndarray) -> np.ndarray:
    """The re-rank vectors (float32) of FAISS ``ids``, read from the shards holding them (a
    memory-mapped file reads those rows only, in file order); an id no shard holds is refused, as
    FAISS's ``reconstruct`` refuses it."""
    if gallery._lookup is None:        # per shard, once per version: its ids sorted, and their rows
        gallery._lookup = []
        for s in gallery.loaded():
            own = s.listings[ID].to_numpy(np.int64)
            order = np.argsort(own, kind="stable")
            gallery._lookup.append((own[order], order, s.exact))
    out = np.zeros((len(ids), gallery.loaded()[0].index.d), np.float32)
    held = np.zeros(len(ids), bool)
    for own, order, exact in gallery._lookup:
        at = np.searchsorted(own, ids)
        hit = at < len(own)
        hit[hit] = own[at[hit]] == ids[hit]
        if hit.any():
            rows, where = order[at[hit]], np.flatnonzero(hit)
            by_row = np.argsort(rows)
            out[where[by_row]] = exact[rows[by_row]]
            held |= hit
    if not held.all():
        raise RuntimeError(f"id {int(ids[~held][0])} is not in the gallery")
    if not np.isfinite(out).all():     # a file overwritten in place keeps its digest; nan would sort last
        raise HierError(f"the gallery's {VECTORS} holds a vector that is not finite (the file is damaged); "
                        "`hier index rebuild ARTIFACT` writes it again")
    return out
