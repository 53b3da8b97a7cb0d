"""Similar-listing search: a FAISS index of listing embeddings plus a metadata table.

Embeddings are L2-normalised, so inner product is cosine similarity. An artifact served by its class
statistics searches in the *whitened* embedding (``S^-1/2 z``, renormalised, with ``S`` the base
classes' shared within-class covariance): directions along which photos of one car differ count less,
those that tell cars apart count more (README, enrollment benchmark: Recall@1 on unseen classes). The
transform is inside the FAISS index (``IndexPreTransform``), so queries go in as plain embeddings and
an older gallery keeps answering as it was built. Each listing image gets a stable
int64 id (``add_with_ids``), so removing listings never renumbers the rest. The index lives in
``ARTIFACT/gallery/`` (``index.faiss`` + ``listings.csv`` + ``gallery.json``) and moves with the artifact.

Sharding by time: a gallery is one or more shards, each a FAISS index of the gallery's kind with its
listing rows (``BASE`` in the folder itself, the others in ``gallery/shards/NAME/``). A day's listings
go into a small shard of their own (``add --shard``), which starts as the trained empty index
(``empty.faiss``: the IVF kinds' coarse quantizer and codebooks, so nothing is trained again and
nothing else is rewritten); listings that expire together go as one shard (``drop``: gallery.json
stops listing it, O(1), where ``remove_ids`` on a big IVF scans its lists); small shards are compacted
by ``merge`` (FAISS's ``merge_from``: the inverted lists appended, nothing re-encoded). A search is one
search over all of them with the shards' own ids (unique across the gallery): the IVF kinds as one IVF
index reading every shard's inverted lists (``HStackInvertedLists``: the same quantizer, so the top k
is that of one index of everything, at the cost of one), flat and HNSW by FAISS's ``IndexShards``.
The seller's columns are kept as given; hier's own (FAISS id, predicted class/brand/model, similarity)
are named ``hier_*``, a prefix listings may not use.

``build`` and ``add`` embed the photos *outside* the artifact's lock (a service reading the artifact
meanwhile is never stalled by a long embedding) and hold it only to check and save: the artifact's
weights, taxonomy and config must still be those the photos were embedded with (else they are embedded
again), and ``add`` reads, extends and saves the gallery under the lock, so two ``hier index add`` at
once both land.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import mmap
import os
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pandas as pd

from hier import artifact, fileio
from hier.artifact import GALLERY
from hier.data import image_files, read_table, refuse_listed, first_repeat, require_cells
from hier.errors import HierError, HierWarning
from hier.metrics import answer, path_of
from hier.engine.predictor import Predictor, artifact_predictor, device

KINDS = ("flat", "ivf", "hnsw", "pq")
PREFIX = "hier_"                       # hier's own listing columns; reserved in users' listings
ID, CLASS, BRAND, MODEL, SIMILARITY = (PREFIX + c for c in ("id", "class", "brand", "model", "similarity"))
# Sellers' cells come back as written, as text ("01234" stays "01234"): only an empty cell is missing
# ("n/a", "NA", "null" stay text).
AS_GIVEN = dict(dtype=str, keep_default_na=False, na_values=[""])
EMBED_TRIES = 3                        # embeddings redone when the artifact changed meanwhile, then refused
SEARCH_SHRINK = 0.5                    # covariance shrinkage of the search whitening (measured: README)
# Searches' defaults per kind (each call may give its own): nprobe of the IVF kinds, efSearch of HNSW;
# pq's from scripts/bench_gallery.py (README: re-ranked, Recall@10 is level from nprobe 8 to 64 at 1M).
NPROBE = {"ivf": 16, "pq": 16}
EF_SEARCH = 64
PQ_DIMS, PQ_BITS = 4, 6               # pq: one 6-bit code per 4 dimensions (256-d: 48 bytes + 8 of id; README)
PQ_MIN = 39 * 2 ** PQ_BITS             # pq trains 64 centroids per sub-quantizer: FAISS asks 39 points each
# pq: the codes find k x RERANK candidates, which the listings' vectors as searched, kept beside the index
# as float16 (``VECTORS``, memory-mapped: read for the candidates only), re-rank exactly. Measured at 1M
# (README): Recall@10 0.23 by the codes alone, 0.95 re-ranking 200, 0.98 re-ranking 500, p95 1.3 ms.
RERANK = 50
VECTORS = "vectors.npy"
GPU_MAX_K = 2048                       # the most neighbours FAISS's GPU indexes return per query
TRAIN_PER_LIST, TRAIN_MIN = 50, 100_000  # IVF training sample: 50 vectors per list, at least 100k (or all)
LABEL_CHUNK = 65_536                   # listings labelled per call of ``labels`` (memory of one chunk)
BASE = "base"                          # the shard every gallery has: gallery/index.faiss + listings.csv
SHARDS = "shards"                      # the others: gallery/shards/NAME/index.faiss + listings.csv
TEMPLATE = "empty.faiss"               # the trained empty index every new shard starts as
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PROBES = 64                            # fixed random embeddings whose answers stand for a head (``answers_digest``)


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
        # measured by scripts/bench_gallery.py among codes of at most 64 bytes a listing (README): an OPQ
        # rotation + 8-bit PQ48 found more of the exact top 10 (0.36 vs 0.22 at 1M) but trains 2.3x longer;
        # "np": no polysemous training (hier never searches by Hamming distance, and it costs minutes)
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


def ivf_of(index: faiss.Index):
    """The IndexIVF inside ``index`` (behind any pre-transform), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def whitening_of(index: faiss.Index):
    """hier's whitening pre-transform (``whitened``: a linear map, then a renormalisation) of ``index``:
    (the linear map, the index behind it), or None (another pre-transform, e.g. an OPQ rotation, is
    no whitening)."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexPreTransform) or index.chain.size() != 2:
        return None
    if not isinstance(faiss.downcast_VectorTransform(index.chain.at(1)), faiss.NormalizationTransform):
        return None
    return faiss.downcast_VectorTransform(index.chain.at(0)), faiss.downcast_index(index.index)


def search_parameters(index: faiss.Index, keep: list, nprobe: int | None = None, ef_search: int | None = None,
                      sel: faiss.IDSelector | None = None) -> faiss.SearchParameters:
    """FAISS's per-call ``SearchParameters`` for ``index``: through each ``IndexPreTransform``
    (``SearchParametersPreTransform``, whose inner parameters FAISS applies to the inner index) and
    ``IndexIDMap2`` (which translates ``sel`` to its inner positions itself) down to the IVF
    (``SearchParametersIVF(nprobe, sel)``), the HNSW (``SearchParametersHNSW(efSearch, sel)``) or a
    flat index (``SearchParameters(sel)``). ``keep`` holds the objects the C++ parameters point to for
    as long as the search runs (SWIG does not)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = search_parameters(index.index, keep, nprobe, ef_search, sel)
    elif isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return search_parameters(index.index, keep, nprobe, ef_search, sel)
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe or index.nprobe)
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search or index.hnsw.efSearch)
    else:
        params = faiss.SearchParameters()
    if sel is not None and not isinstance(params, faiss.SearchParametersPreTransform):
        params.sel = sel
    keep.append(params)
    return params


class Shard:
    """One FAISS index of the gallery's kind and its listing rows (``hier_id``: the index's FAISS ids,
    unique across the gallery's shards). ``index`` None: listed in gallery.json but not read (a writer
    that touches other shards only; ``rows`` is its count). ``exact``: the pq kind's re-rank vectors,
    row i for listing row i (None: a shard without them, written by an older hier)."""

    def __init__(self, index: faiss.Index | None, listings: pd.DataFrame | None, rows: int = 0,
                 exact: np.ndarray | None = None, vectors_of: str | None = None):
        self.index, self.rows, self.exact = index, rows, exact
        self.saved_vectors_of = vectors_of         # an unread shard's: carried into gallery.json as it was
        self.listings = None if listings is None else listings.reset_index(drop=True)
        ivf = ivf_of(index) if index is not None else None
        if ivf is not None:                # ids -> vectors (``vectors``) and remove_ids without a scan
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def __len__(self) -> int:
        return self.rows if self.listings is None else len(self.listings)

    def vectors_of(self) -> str | None:
        """What ties ``vectors.npy`` to this shard's listings (gallery.json records it): the digest of
        the ids its rows belong to, in order; None without vectors."""
        if self.index is None:
            return self.saved_vectors_of
        return None if self.exact is None else ids_digest(self.listings[ID].to_numpy(np.int64))


class Gallery:
    """FAISS indexes (shards, ``SHARDING``) + one metadata row per vector (column ``hier_id`` is the
    FAISS id)."""

    def __init__(self, shards: dict[str, Shard], kind: str, fingerprint: str | None = None,
                 labels_digest: str | None = None, template: bytes | None = None, next_id: int | None = None):
        """``shards`` on the CPU (where they are edited and saved), ``BASE`` first; ``fingerprint``: the
        artifact weights' that embedded its vectors (None: a gallery from before it was recorded);
        ``labels_digest``: the ``answers_digest`` of the head that wrote every listing's
        hier_class/brand/model (None: unknown, or listings labelled by different heads); ``template``:
        the trained empty index a new shard starts as (None: derived from a shard when first needed);
        ``next_id``: the FAISS id of the next listing (ids are never reused, a dropped shard's neither)."""
        self.shards, self.kind = shards, kind
        self.fingerprint, self.labels_digest, self.template = fingerprint, labels_digest, template
        self.nprobe = NPROBE.get(kind, NPROBE["ivf"])    # searches' defaults; each call may give its own
        self.ef_search = EF_SEARCH
        self._gpu = None                   # the GPU copy searches run on (``on_gpus``)
        self._changed()
        self.next_id = next_id if next_id is not None else \
            int(self.listings[ID].max()) + 1 if len(self.listings) else 0

    def _changed(self) -> None:
        """After an edit: the joined listings, the IndexShards and the re-rank lookup are made again when
        next needed."""
        self._listings = self._joined = self._lookup = None

    def _loaded(self) -> list[Shard]:
        return [s for s in self.shards.values() if s.index is not None]

    @property
    def listings(self) -> pd.DataFrame:
        """Every read shard's listings, in shard order (the same object until the next edit)."""
        if self._listings is None:
            parts = [s.listings for s in self._loaded()]
            self._listings = parts[0] if len(parts) == 1 else \
                pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({ID: pd.Series(dtype=np.int64)})
        return self._listings

    @property
    def index(self) -> faiss.Index:
        """The one index searches run on: the only shard itself; for the IVF kinds, one IVF index over
        every shard's inverted lists (``_stacked``: one search, as if the gallery were one index); for the
        others, FAISS's ``IndexShards`` over them (``successive_ids=False``: each shard answers with its
        own ids, unique across the gallery; it searches every shard and merges their top k)."""
        loaded = [s.index for s in self._loaded()]
        if len(loaded) == 1:
            return loaded[0]
        if self._joined is None:
            self._joined = _stacked(loaded, self.empty_index()) if ivf_of(loaded[0]) is not None else _joined(loaded)
        if isinstance(self._joined, faiss.IndexShards):
            self._joined.syncWithSubIndexes()          # ntotal after an add to a shard
        else:
            _sync_ntotal(self._joined, sum(i.ntotal for i in loaded))
        return self._joined

    def on_gpus(self, gpus: int | None = None) -> "Gallery":
        """Search on the GPUs when ``placement`` says so (edits and saves stay on the CPU shards)."""
        gpus = faiss_gpus() if gpus is None else gpus
        if placement(self.kind, gpus, "search") == "gpu":
            copies = [faiss.index_cpu_to_all_gpus(s.index) for s in self._loaded()]
            self._gpu = copies[0] if len(copies) == 1 else _joined(copies)
        return self

    @classmethod
    def build(cls, vectors: np.ndarray, listings: pd.DataFrame, kind: str = "flat",
              whitening: np.ndarray | None = None, fingerprint: str | None = None,
              labels_digest: str | None = None, factory: str | None = None,
              parts: dict[str, np.ndarray] | None = None) -> "Gallery":
        """A new gallery of ``vectors``; with ``whitening`` (D x D) it searches in ``normalise(z @ W)``.
        IVF kinds train on ``training_sample`` (in the whitened space, through the pre-transform), once:
        every shard starts as that trained empty index. ``factory``: another ``index_factory`` string
        than the kind's (benchmarks compare candidates). ``parts``: the rows of each shard (default:
        all in ``BASE``)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(vectors.shape[1], factory or factory_string(kind, len(vectors), vectors.shape[1]),
                                    faiss.METRIC_INNER_PRODUCT)
        if whitening is not None:
            index = whitened(index, whitening)
        if not index.is_trained:
            check_size(kind, len(vectors))
            index.train(training_sample(vectors, faiss.extract_index_ivf(index).nlist))
        gallery = cls({}, kind, fingerprint, labels_digest, faiss.serialize_index(index).tobytes(), 0)
        empty = listings.iloc[:0].assign(**{ID: pd.Series(dtype=np.int64)})
        parts = parts or {BASE: np.arange(len(vectors))}
        for name, rows in ({BASE: parts.get(BASE, np.arange(0))} | parts).items():
            gallery.shards[name] = gallery._new_shard(empty)
            gallery.add(vectors[rows], listings.iloc[rows], name)
        return gallery

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards.values())

    def empty_index(self) -> faiss.Index:
        """A new shard: a copy of the trained empty index (IVF kinds: the same coarse quantizer and PQ
        codebooks, so no training, and its lists can be merged into another shard's)."""
        if self.template is None:
            # a gallery of an older hier: its first shard copied and emptied, once (saved as TEMPLATE)
            index = faiss.deserialize_index(np.frombuffer(index_bytes(self._loaded()[0].index), dtype=np.uint8))
            index.reset()
            self.template = index_bytes(index)
        return faiss.deserialize_index(np.frombuffer(self.template, dtype=np.uint8))

    def _new_shard(self, listings: pd.DataFrame) -> Shard:
        """An empty shard (``empty_index``; pq: with no re-rank vectors yet); ``listings``: no rows."""
        index = self.empty_index()
        return Shard(index, listings, exact=np.zeros((0, index.d), np.float16) if self.kind == "pq" else None)

    def searched(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` as the gallery's index compares them: through its pre-transform (hier's whitening
        and renormalisation), as FAISS applies it to every vector added and every query."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.downcast_index(self._loaded()[0].index if self._loaded() else self.empty_index())
        if isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
        return x

    def add(self, vectors: np.ndarray, listings: pd.DataFrame, shard: str = BASE) -> None:
        """Listings into ``shard`` (a new one starts as ``empty_index``), with the gallery's next ids."""
        clash = set(listings["listing_id"].astype(str)) & set(self.listings.get("listing_id", pd.Series()).astype(str))
        if clash:
            raise HierError(f"listing {sorted(clash)[0]!r} is already in the index ({len(clash)} clashes)")
        if shard not in self.shards:
            self.shards[shard] = self._new_shard(listings.iloc[:0].assign(**{ID: pd.Series(dtype=np.int64)}))
        target = self.shards[shard]
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        target.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        if target.exact is not None:
            target.exact = np.concatenate([whole(target.exact), self.searched(vectors).astype(np.float16)])
        target.listings = pd.concat([target.listings, listings.assign(**{ID: ids})], ignore_index=True)
        self.next_id += len(vectors)
        self._changed()

    def remove(self, listing_ids: list[str]) -> int:
        wanted = set(map(str, listing_ids))
        unknown = wanted - set(self.listings.get("listing_id", pd.Series()).astype(str))
        if unknown:
            raise HierError(f"listing {sorted(unknown)[0]!r} is not in the index")
        if self.kind == "hnsw":
            raise HierError("an HNSW index cannot remove vectors; rebuild it with `hier index build`")
        removed = 0
        for s in self._loaded():
            gone = s.listings["listing_id"].astype(str).isin(wanted).to_numpy()
            if gone.any():
                removed += s.index.remove_ids(s.listings.loc[gone, ID].to_numpy(np.int64))
                s.listings = s.listings[~gone].reset_index(drop=True)
                if s.exact is not None:
                    s.exact = np.asarray(whole(s.exact)[~gone])
        self._changed()
        return int(removed)

    def _named(self, name: str) -> Shard:
        if name not in self.shards:
            raise HierError(f"the gallery has no shard {name!r} (its shards: {', '.join(self.shards)})")
        return self.shards[name]

    def drop(self, name: str) -> int:
        """Forget shard ``name`` whole (its listings expired): the rows it held. ``BASE``, which every
        gallery has, is emptied instead."""
        n = len(self._named(name))
        if name == BASE:
            self.shards[BASE] = self._new_shard(self.shards[BASE].listings.iloc[:0])
        else:
            del self.shards[name]
        self._changed()
        return n

    def merge(self, names: list[str], into: str) -> int:
        """Shards ``names`` compacted into shard ``into`` (new, or one of them, or another): FAISS's
        ``merge_from`` moves the IVF kinds' lists as they are (no re-encoding, no training); flat and
        HNSW shards get the others' vectors added (reconstructed as stored). The merged shards are
        forgotten (``BASE`` emptied). Returns the rows moved."""
        sources = [n for n in dict.fromkeys(names) if n != into]
        for n in sources:
            self._named(n)
        if not sources:
            raise HierError(f"nothing to merge into {into!r}: name other shards than it")
        dest = self.shards[into] if into in self.shards else \
            self._new_shard(self.shards[sources[0]].listings.iloc[:0])
        kinds = {n: kind_of(self.shards[n].index) for n in sources + ([into] if into in self.shards else [])}
        if len(set(kinds.values())) > 1:
            raise HierError("shards of different kinds cannot be merged: "
                            + ", ".join(f"{n} is {k or 'unknown'}" for n, k in kinds.items()))
        moved = 0
        for n in sources:
            src = self.shards[n]
            try:
                _merge_into(dest.index, src.index, src.listings[ID].to_numpy(np.int64))
            except RuntimeError as e:
                raise HierError(f"shard {n!r} cannot be merged into {into!r} (not trained as one: "
                                f"{str(e).splitlines()[0].split(': ')[-1][:100]})") from None
            dest.listings = pd.concat([dest.listings, src.listings], ignore_index=True)
            dest.exact = None if dest.exact is None or src.exact is None else \
                np.concatenate([whole(dest.exact), whole(src.exact)])
            moved += len(src)
        for n in sources:
            self.drop(n)
        self.shards[into] = dest
        self._changed()
        return moved

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, ef_search: int | None = None,
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
        if self._reranks():
            deep = max(k, min(k * (rerank or RERANK), sum(s.index.ntotal for s in self._loaded())))
            _, candidates = self._search(queries, deep, nprobe, ef_search, allowed)
            return self._reranked(queries, candidates, k)
        return self._search(queries, k, nprobe, ef_search, allowed)

    def _search(self, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None,
                allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is not None:
            if allowed is not None:
                raise HierError("a search restricted to some listings runs on the CPU index, not the GPUs")
            if ivf_of(self._loaded()[0].index) is not None:
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", int(nprobe or self.nprobe))
            return self._gpu.search(queries, min(k, GPU_MAX_K))
        keep: list = []
        sel = None
        if allowed is not None:
            # a bitmap over the ids (FAISS's IDSelectorBitmap): 0.07 ms for 90k allowed of 1M ids, where
            # an IDSelectorBatch (a hash set) takes 20 ms to build
            allowed = np.asarray(allowed, dtype=np.int64)
            bits = np.zeros(int(allowed.max()) + 1 if len(allowed) else 1, dtype=bool)
            bits[allowed] = True
            bitmap = np.packbits(bits, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            keep.append(bitmap)
        # every shard has the one structure: the first one's parameters fit them all
        params = search_parameters(self._loaded()[0].index, keep, nprobe or self.nprobe,
                                   ef_search or self.ef_search, sel)
        return self.index.search(queries, k, params=params)

    def _reranks(self) -> bool:
        """Whether searches re-rank (``RERANK``): every read shard keeps its re-rank vectors."""
        loaded = self._loaded()
        return bool(loaded) and all(s.exact is not None for s in loaded)

    def _reranked(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of each query's ``candidates`` by their exact similarity (the re-rank vectors), as
        FAISS answers: (similarities, ids), -1 ids (and FAISS's lowest similarity) where fewer exist."""
        sims = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        q = self.searched(queries)
        for i, row in enumerate(candidates):
            found = np.unique(row[row >= 0])
            s = self._exact_of(found) @ q[i]
            best = np.argsort(-s, kind="stable")[:k]
            sims[i, :len(best)], ids[i, :len(best)] = s[best], found[best]
        return sims, ids

    def _exact_of(self, ids: np.ndarray) -> np.ndarray:
        """The re-rank vectors (float32) of FAISS ``ids``, read from the shards holding them (a
        memory-mapped file reads those rows only, in file order); an id no shard holds is refused, as
        FAISS's ``reconstruct`` refuses it."""
        if self._lookup is None:           # per shard, once per version: its ids sorted, and their rows
            self._lookup = []
            for s in self._loaded():
                own = s.listings[ID].to_numpy(np.int64)
                order = np.argsort(own, kind="stable")
                self._lookup.append((own[order], order, s.exact))
        out = np.zeros((len(ids), self._loaded()[0].index.d), np.float32)
        held = np.zeros(len(ids), bool)
        for own, order, exact in self._lookup:
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

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The embeddings stored under FAISS ``ids``, as they went in (a whitened gallery keeps
        ``normalise(z @ W)``; ``z`` is unit-length, so ``normalise(y @ W^-1)`` gives it back). The pq kind
        gives back its re-rank vectors (float16), renormalised; without them (a gallery of an older hier)
        its codes' reconstruction, within the PQ's error of the embedding (README)."""
        ids = np.asarray(ids, dtype=np.int64)
        loaded = self._loaded()
        if self._reranks():
            return self._unwhitened(loaded[0].index, self._exact_of(ids))
        if len(loaded) == 1:
            return self._vectors_of(loaded[0].index, ids)
        out = np.zeros((len(ids), loaded[0].index.d), dtype=np.float32)
        for s in loaded:
            mine = np.isin(ids, s.listings[ID].to_numpy(np.int64))
            if mine.any():
                out[mine] = self._vectors_of(s.index, ids[mine])
        return out

    def _vectors_of(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray:
        w = whitening_of(index)
        return self._unwhitened(index, (index if w is None else w[1]).reconstruct_batch(ids))

    def _unwhitened(self, index: faiss.Index, y: np.ndarray) -> np.ndarray:
        """Vectors ``y`` as ``index`` compares them back to the embeddings (see ``vectors``)."""
        w = whitening_of(index)
        if w is None:
            return y / np.linalg.norm(y, axis=1, keepdims=True) if self.kind == "pq" else y
        if getattr(self, "_unwhiten", None) is None:
            linear = w[0]
            a = faiss.vector_to_array(linear.A).reshape(linear.d_out, linear.d_in)     # y = z @ a.T
            self._unwhiten = np.linalg.inv(a.T).astype(np.float32)
        z = y @ self._unwhiten
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def _by_id(self) -> pd.DataFrame:
        """The listings indexed by FAISS id, built once per version of the table (a 100k-row
        ``set_index`` per query would cost more than the search), hier's labels as categories (a filter's
        ``== brand`` over 1M listings: 0.3 ms, not 12)."""
        if getattr(self, "_by_id_of", None) is not self.listings:
            self._by_id_of, self._by_id_frame = self.listings, _categories(self.listings.set_index(ID))
        return self._by_id_frame

    def labelled(self, labels, key=None) -> pd.DataFrame:
        """Every listing with the columns ``labels(vectors)`` gives of its stored vector (the head of now),
        indexed by FAISS id; kept for the next call with the same ``key`` on this version of the table
        (None: computed every call). An index that cannot give its vectors back: the labels as indexed."""
        cached = getattr(self, "_labelled", None)
        if key is not None and cached is not None and cached[0] is self.listings and cached[1] == key:
            return cached[2]
        ids = self.listings[ID].to_numpy(np.int64)
        try:
            parts = [labels(self.vectors(ids[s:s + LABEL_CHUNK])) for s in range(0, len(ids), LABEL_CHUNK)]
            columns = {c: np.concatenate([np.asarray(p[c], dtype=object) for p in parts]) for c in parts[0]} \
                if parts else {}
            frame = _categories(self.listings.assign(**columns).set_index(ID))
        except RuntimeError:
            frame = self._by_id()
        if key is not None:
            self._labelled = (self.listings, key, frame)
        return frame

    def results(self, queries: np.ndarray, k: int = 10, where=None, labels=None, labels_key=None,
                nprobe: int | None = None) -> list[pd.DataFrame]:
        """Metadata rows of the nearest listings per query, best first. ``labels(vectors)``: hier's
        class/brand/model columns of the listings from their stored vectors, by the artifact's head of
        now (a class enrolled after indexing is found), instead of the ones written when they were
        indexed. ``where(rows)`` filters (e.g. same brand): it is asked once of every listing (labelled
        by ``labels``, once per ``labels_key``: ``labelled``; it sees the listings' columns indexed by
        ``hier_id``, not the similarity), and the queries are one FAISS search restricted to the
        listings it keeps (an ID selector), so k rows come back whenever k listings pass and the search
        reaches them. On the GPUs, which take no selector, the search goes deeper until k rows pass."""
        if k < 1:
            raise HierError(f"k must be at least 1, not {k}")
        queries = np.atleast_2d(queries)
        if not len(self):                    # every listing removed: nothing is near
            return [self.listings.iloc[:0].assign(**{SIMILARITY: pd.Series(dtype=np.float32)}) for _ in queries]
        if where is not None and self._gpu is not None:
            return [self._deepening(q, k, where, labels, nprobe) for q in queries]
        by_id, allowed = self._by_id(), None
        if where is not None:
            by_id = self.labelled(labels, labels_key) if labels is not None else by_id
            allowed = by_id.index.to_numpy(np.int64)[np.asarray(where(by_id), dtype=bool)]
            if not len(allowed):
                return [_plain(by_id.iloc[:0].reset_index()).assign(**{SIMILARITY: pd.Series(dtype=np.float32)})
                        for _ in queries]
        sims, ids = self.search(queries, min(k, len(self) if allowed is None else len(allowed)), nprobe,
                                allowed=allowed)
        found = [row[row >= 0] for row in ids]
        rows = [_plain(by_id.loc[f].assign(**{SIMILARITY: s[r >= 0]}).reset_index())
                for f, s, r in zip(found, sims, ids)]
        if labels is not None and where is None:       # the candidates alone labelled, in one call
            every = np.concatenate(found)
            if len(every):
                try:
                    columns = labels(self.vectors(every))
                except RuntimeError:                   # an index that cannot give its vectors back
                    columns = None
                if columns is not None:
                    starts = np.cumsum([0] + [len(f) for f in found])
                    rows = [r.assign(**{c: list(v[a:b]) for c, v in columns.items()})
                            for r, a, b in zip(rows, starts, starts[1:])]
        return rows

    def _deepening(self, q: np.ndarray, k: int, where, labels, nprobe) -> pd.DataFrame:
        """One query's k rows that pass ``where``, searching deeper until k pass or the gallery is
        exhausted (the GPUs' way: they take no ID selector)."""
        by_id, depth = self._by_id(), k
        while True:
            sims, ids = self.search(q[None], min(depth, len(self)), nprobe)
            found = ids[0][ids[0] >= 0]
            rows = _plain(by_id.loc[found].assign(**{SIMILARITY: sims[0][ids[0] >= 0]}).reset_index())
            if labels is not None and len(found):
                try:
                    rows = rows.assign(**labels(self.vectors(found)))
                except RuntimeError:     # an index that cannot give its vectors back: labels as indexed
                    labels = None
            rows = rows[where(rows)]
            if len(rows) >= k or depth >= len(self):
                return rows.head(k).reset_index(drop=True)
            depth *= 4

    # --- persistence --------------------------------------------------------------------------------
    def save(self, artifact_dir: str | Path, only: list[str] | None = None) -> None:
        """gallery.json, the template and the files of the shards ``only`` names (default: every one)
        land together (one atomic set, gallery.json renamed last), under the artifact's lock; then the
        folders of shards no longer listed are removed (a crash before that leaves a folder nothing
        lists, removed by the next save)."""
        folder = Path(artifact_dir) / GALLERY
        names = list(self.shards) if only is None else only
        meta = {"kind": self.kind, "fingerprint": self.fingerprint, "labels": self.labels_digest,
                "next_id": self.next_id, "shards": {n: len(s) for n, s in self.shards.items()},
                "vectors": {n: d for n, s in self.shards.items() if (d := s.vectors_of()) is not None}}
        writers = {}
        for name in names:
            shard, at = self.shards[name], shard_folder(folder, name)
            # bytes written by Python, not FAISS's own writer: a full disk then raises OSError(ENOSPC)
            writers[at / "index.faiss"] = lambda p, s=shard: p.write_bytes(index_bytes(s.index))
            writers[at / "listings.csv"] = lambda p, s=shard: s.listings.to_csv(p, index=False, encoding="utf-8")
            if shard.exact is not None:
                writers[at / VECTORS] = lambda p, s=shard: _save_array(p, whole(s.exact))
        with fileio.locked(artifact_dir):
            if only is None or not (folder / TEMPLATE).is_file():
                if self.template is None and self._loaded():
                    self.empty_index()             # derived once from a gallery of an older hier
                if self.template is not None:
                    writers[folder / TEMPLATE] = lambda p: p.write_bytes(self.template)
            writers[folder / "gallery.json"] = lambda p: fileio.write_json(p, meta)
            fileio.atomic_write_all(writers)
            for name in names:             # a shard saved without re-rank vectors keeps none from before
                if self.shards[name].exact is None:
                    (shard_folder(folder, name) / VECTORS).unlink(missing_ok=True)
            if (folder / SHARDS).is_dir():
                for old in (folder / SHARDS).iterdir():
                    if old.name not in self.shards:
                        shutil.rmtree(old, ignore_errors=True)

    def _index_bytes(self, name: str = BASE) -> bytes:
        return index_bytes(self.shards[name].index)

    @classmethod
    def load(cls, artifact_dir: str | Path, only: list[str] | None = None) -> "Gallery":
        """The saved gallery on the CPU (``on_gpus`` for serving), refused when the artifact's weights
        are no longer those that embedded it (``hier train --resume`` since): its vectors would not be
        comparable with new queries. ``only``: the shards to read (the others are listed, not read: a
        writer of one shard never reads the rest; a gallery without a template reads ``BASE`` too, to
        make it)."""
        folder = saved_gallery(artifact_dir)
        with fileio.locked(artifact_dir):
            meta = fileio.read_json(folder / "gallery.json") if (folder / "gallery.json").is_file() else None
            weights = artifact.read_config(artifact_dir).get("fingerprint")
            template = (folder / TEMPLATE).read_bytes() if (folder / TEMPLATE).is_file() else None
            listed = (meta.get("shards") if isinstance(meta, dict) else None) or {BASE: None}
            vectors_of = meta.get("vectors") if isinstance(meta, dict) else None
            vectors_of = vectors_of if isinstance(vectors_of, dict) else {}
            wanted = set(listed if only is None else only) | ({BASE} if template is None else set())
            shards, legacy = {}, None
            for name, rows in listed.items():
                if name not in wanted:
                    shards[name] = Shard(None, None, rows or 0, vectors_of=vectors_of.get(name))
                    continue
                at = shard_folder(folder, name)
                listings = read_saved(folder, artifact_dir, lambda: pd.read_csv(at / "listings.csv", encoding="utf-8",
                                                                                   **AS_GIVEN))
                index = read_saved(folder, artifact_dir, lambda: faiss.read_index(str(at / "index.faiss")))
                exact = read_saved(folder, artifact_dir, lambda: mapped_rows(at / VECTORS)) \
                    if (at / VECTORS).is_file() else None
                if name == BASE and meta is None and ID not in listings and "kind" in listings:
                    # written before hier_* columns and gallery.json: id/class/brand/model/kind were hier's
                    legacy = {"kind": listings.pop("kind").iloc[0] if len(listings) else "flat"}
                    listings = listings.rename(columns={c: PREFIX + c for c in ("id", "class", "brand", "model")})
                shards[name] = (index, listings, exact)
        meta = legacy or meta
        if not isinstance(meta, dict) or meta.get("kind") not in KINDS or \
                any(ID not in s[1] for s in shards.values() if isinstance(s, tuple)):
            raise HierError(f"{folder} is damaged (gallery.json {'missing' if meta is None else 'unreadable'}, or "
                            f"listings.csv without {ID}); build it again with `hier index build {artifact_dir} LISTINGS`")
        if meta.get("fingerprint") and weights and meta["fingerprint"] != weights:
            raise HierError(f"{artifact_dir}/{GALLERY} was embedded by other weights than the artifact's (trained "
                            f"again since?); re-embed its listings with `hier index rebuild {artifact_dir}`")
        if not meta.get("fingerprint"):
            warnings.warn(f"{artifact_dir}/{GALLERY} was built by an older hier, which did not record the weights it "
                          f"embedded with; if the artifact was trained again since, `hier index rebuild {artifact_dir}`",
                          HierWarning, stacklevel=2)
        for name, s in shards.items():
            if not isinstance(s, tuple):
                continue
            index, listings, exact = s
            ids = pd.to_numeric(listings[ID], errors="coerce")
            if ids.isna().any():
                raise HierError(f"{shard_folder(folder, name)}/listings.csv has a {ID} that is not a number; build "
                                f"it again with `hier index build {artifact_dir} LISTINGS`")
            found = kind_of(index)
            if name != BASE and found != meta["kind"]:
                raise HierError(f"{folder} is damaged: shard {name!r} is {found or 'an unknown'} index, the gallery "
                                f"{meta['kind']}; drop it (`hier index drop {artifact_dir} {name}`) or build again")
            ids = ids.astype(np.int64)
            if meta["kind"] == "pq" and (exact is None or exact.shape != (len(listings), index.d)
                                         or not np.issubdtype(exact.dtype, np.floating)
                                         or vectors_of.get(name) != ids_digest(ids.to_numpy())):
                why = "is missing" if exact is None else "was not written with its listings"
                warnings.warn(f"{shard_folder(folder, name) / VECTORS} {why}: the gallery is searched by its codes "
                              f"alone, less exactly; `hier index rebuild {artifact_dir}` writes it again",
                              HierWarning, stacklevel=2)
                exact = None
            shards[name] = Shard(index, listings.assign(**{ID: ids}), exact=exact)
            if exact is not None:
                prefetch(shard_folder(folder, name) / VECTORS)
        next_id = meta.get("next_id")
        if next_id is None:                    # before shards: one index, its largest id + 1
            ids = shards[BASE].listings[ID]
            next_id = int(ids.max()) + 1 if len(ids) else 0
        return cls(shards, meta["kind"], meta.get("fingerprint"), meta.get("labels"), template, int(next_id))


def mapped_rows(path: Path) -> np.ndarray:
    """A saved ``.npy`` array memory-mapped for reading a few rows at a time: the map is advised
    ``MADV_RANDOM``, so a fault reads its page, not the 8 MB around it a sequential reader wants (with
    that readahead a query's few hundred rows from a cold cache read most of a 1M gallery's file:
    0.50 s a query here, against 0.04 s; README). ``prefetch`` warms the whole file instead."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"{path.name}: .npy format {version} is not one numpy writes")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if dtype.hasobject or os.fstat(f.fileno()).st_size < offset + int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{path.name} is cut or holds objects")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


def prefetch(path: Path) -> None:
    """Have the kernel read ``path`` into the page cache, in a background thread (``load`` returns at
    once). A pq shard's memory-mapped vectors are read at random, a few hundred rows a query: from a
    cold cache each row is a disk read (0.04 s a query here, README), where one sequential pass reads
    1M listings' 0.5 GB in about a second. ``POSIX_FADV_WILLNEED`` over the whole file reads only its
    first 8 MB on Linux, so it is asked chunk by chunk. Not for a file over half the machine's memory
    (it would evict its own pages and everyone else's); a no-op where the call does not exist (Windows,
    macOS)."""
    if hasattr(os, "posix_fadvise") and path.stat().st_size < memory_bytes() / 2:
        threading.Thread(target=_read_ahead, args=(path,), name=f"prefetch {path.name}", daemon=True).start()


def memory_bytes() -> float:
    """The machine's physical memory (infinite where the system does not say)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return float("inf")


def whole(rows: np.ndarray) -> np.ndarray:
    """``rows`` about to be read from end to end (an edit or a save copies a shard's vectors): a
    ``mapped_rows`` map is advised sequential first, or a cold file would be read a page per fault (a
    cold 0.5 GB file copied in 9.7 s advised random, 1.1 s advised sequential, here)."""
    if isinstance(rows.base, mmap.mmap) and hasattr(mmap, "MADV_SEQUENTIAL"):
        rows.base.madvise(mmap.MADV_SEQUENTIAL)
    return rows


def _read_ahead(path: Path, chunk: int = 8 << 20) -> None:
    with contextlib.suppress(OSError):        # a file replaced or removed meanwhile: nothing to warm
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, os.fstat(fd).st_size, chunk):
                os.posix_fadvise(fd, offset, chunk, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def shard_name(name: str | None) -> str:
    """A shard's name as given (``today``: the date of now, UTC, e.g. 2025-03-07), checked: it names a
    folder, so letters, digits, ``.``, ``_`` and ``-``, at most 64."""
    if name in (None, ""):
        return BASE
    if name == "today":
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    if not SHARD_NAME.fullmatch(name):
        raise HierError(f"shard name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, not starting "
                        "with '.', '_' or '-'), e.g. 2025-03-07")
    return name


def shard_folder(folder: Path, name: str) -> Path:
    """Where shard ``name`` of the gallery in ``folder`` lives: ``BASE`` in the folder itself (as a
    gallery of one index always did), the others in ``shards/NAME/``."""
    return folder if name == BASE else folder / SHARDS / name


def gallery_files(artifact_dir: str | Path) -> list[Path]:
    """The files whose stamps say whether a held gallery is still what is on disk: index.faiss first
    (missing: no gallery), every shard's."""
    folder = Path(artifact_dir) / GALLERY
    files = [folder / "index.faiss", folder / "listings.csv", folder / VECTORS, folder / "gallery.json"]
    if (folder / SHARDS).is_dir():
        files += [d / f for d in sorted((folder / SHARDS).iterdir()) for f in ("index.faiss", "listings.csv", VECTORS)]
    return files


def index_bytes(index: faiss.Index) -> bytes:
    """The index serialised without the IVF kinds' id -> position hash table (16 bytes a listing in
    the file, a quarter of the pq kind's size; rebuilt from the lists on load)."""
    ivf = ivf_of(index)
    if ivf is None or ivf.direct_map.type == faiss.DirectMap.NoMap:
        return faiss.serialize_index(index).tobytes()
    kind = ivf.direct_map.type
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    try:
        return faiss.serialize_index(index).tobytes()
    finally:
        ivf.set_direct_map_type(kind)


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:            # np.save(path) would add ".npy" to a temporary name
        np.save(f, np.ascontiguousarray(array))


def kind_of(index: faiss.Index) -> str | None:
    """Which of ``KINDS`` an index is, from its structure (behind hier's whitening); None: another."""
    w = whitening_of(index)
    inner = w[1] if w is not None else faiss.downcast_index(index)
    ivf = ivf_of(inner)
    if ivf is not None:
        return "pq" if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ) else "ivf"
    if isinstance(inner, faiss.IndexIDMap2):
        sub = faiss.downcast_index(inner.index)
        return "hnsw" if isinstance(sub, faiss.IndexHNSW) else "flat" if isinstance(sub, faiss.IndexFlat) else None
    return None


def _joined(indexes: list[faiss.Index]) -> faiss.Index:
    """FAISS's ``IndexShards`` over ``indexes`` keeping their own ids, searched one after another (a
    thread per shard was not measured). Each shard runs its whole search, coarse quantizer included:
    a query costs about one search per shard (README), so shards are best kept few (``merge``)."""
    joined = faiss.IndexShards(indexes[0].d, False, False)
    for index in indexes:
        joined.add_shard(index)            # faiss's Python layer keeps each shard referenced
    return joined


def _stacked(indexes: list[faiss.Index], view: faiss.Index) -> faiss.Index:
    """``view`` (the gallery's trained empty index: the shards' coarse quantizer and codebooks) reading
    every shard's inverted lists through FAISS's ``HStackInvertedLists`` (nothing copied; a shard's
    later adds show through). A query is one coarse quantization and one scan of the probed lists,
    where ``IndexShards`` runs the whole search once per shard (1M listings in 31 shards: p95 257 ms
    against 9 ms as one index, README); ids, ``nprobe`` and selectors act as on one index."""
    ivf = ivf_of(view)
    lists = faiss.InvertedListsPtrVector()
    for index in indexes:
        lists.push_back(ivf_of(index).invlists)
    stacked = faiss.HStackInvertedLists(lists.size(), lists.data())
    ivf.replace_invlists(stacked, False)
    # the C++ view points into these: held as FAISS's Python layer holds its own (``referenced_objects``)
    view.referenced_objects = [*getattr(view, "referenced_objects", []), indexes, lists, stacked]
    _sync_ntotal(view, sum(i.ntotal for i in indexes))
    return view


def _sync_ntotal(index: faiss.Index, ntotal: int) -> None:
    """Set ``ntotal`` on ``index`` and every wrapper inside it (each counts what its inner index holds)."""
    outer = faiss.downcast_index(index)
    while True:
        outer.ntotal = ntotal
        if not isinstance(outer, faiss.IndexPreTransform):
            break
        outer = faiss.downcast_index(outer.index)


def _merge_into(dest: faiss.Index, src: faiss.Index, ids: np.ndarray) -> None:
    """``src``'s vectors (FAISS ids ``ids``) into ``dest``: the IVF kinds by FAISS's ``merge_from``
    (the inverted lists appended as they are; FAISS refuses lists of another coarse quantizer), the
    others by adding ``src``'s stored vectors (behind the whitening: added as stored, not whitened
    again)."""
    ivf_d, ivf_s = ivf_of(dest), ivf_of(src)
    if ivf_d is not None and ivf_s is not None:
        kinds = ivf_d.direct_map.type, ivf_s.direct_map.type
        ivf_d.set_direct_map_type(faiss.DirectMap.NoMap)      # FAISS merges lists without direct maps
        ivf_s.set_direct_map_type(faiss.DirectMap.NoMap)
        try:
            ivf_d.merge_from(ivf_s, 0)
        finally:
            ivf_d.set_direct_map_type(kinds[0])
            ivf_s.set_direct_map_type(kinds[1])
    else:
        inner_d, inner_s = (w[1] if (w := whitening_of(i)) is not None else i for i in (dest, src))
        if len(ids):
            inner_d.add_with_ids(inner_s.reconstruct_batch(ids), ids)
    _sync_ntotal(dest, (ivf_d if ivf_d is not None and ivf_s is not None else inner_d).ntotal)   # the wrappers'


def _categories(frame: pd.DataFrame) -> pd.DataFrame:
    """hier's label columns as pandas categories (in the in-memory frames filters run on)."""
    return frame.astype({c: "category" for c in (CLASS, BRAND, MODEL) if c in frame})


def _plain(rows: pd.DataFrame) -> pd.DataFrame:
    """Result rows with hier's label columns as plain text again (as they were read)."""
    return rows.astype({c: object for c in (CLASS, BRAND, MODEL) if c in rows})


def whitened(index: faiss.Index, whitening: np.ndarray) -> faiss.Index:
    """``index`` behind the linear map ``z -> z @ W`` and a renormalisation (FAISS applies both to every
    vector added and every query)."""
    d = whitening.shape[0]
    linear = faiss.LinearTransform(d, d, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(whitening.T, dtype=np.float32).ravel(), linear.A)
    linear.is_trained = True
    out = faiss.IndexPreTransform(faiss.NormalizationTransform(d, 2.0), index)
    out.prepend_transform(linear)          # faiss's Python layer keeps both parts referenced
    return out


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


def label_columns(probs: np.ndarray, taxonomy) -> dict:
    """hier_class / hier_brand / hier_model of listings from their fine-class probabilities (*the*
    answer, as ``similar --same-brand`` reads the query's)."""
    return answer_columns(answer(probs, taxonomy)[2], taxonomy)


def answer_columns(fine: np.ndarray, taxonomy) -> dict:
    """hier_class / hier_brand / hier_model of listings from their answers' fine classes."""
    brand, model, fine = path_of(fine, taxonomy)
    return {CLASS: np.asarray(taxonomy.classes, dtype=object)[fine],
            BRAND: np.asarray(taxonomy.brands, dtype=object)[brand],
            MODEL: np.asarray(taxonomy.models, dtype=object)[model]}


def read_listings(listings: Path, strict: bool = False) -> pd.DataFrame:
    """A folder of photos, searched recursively, symlinked folders included (listing_id = path below it
    without the extension), or a CSV ``listing_id,image[,price,...]`` (``read_table``), checked: images
    exist and decode, ids are unique (a repeat names both files, or both rows), no column uses hier's
    reserved prefix. In a folder, unusable files are skipped (``table.attrs["skipped"]`` says how many)
    unless ``strict``."""
    if listings.is_dir():
        found = image_files([listings], strict)
        table = pd.DataFrame({"listing_id": [p.relative_to(listings).with_suffix("").as_posix() for p in found.paths],
                              "image": [str(p) for p in found.paths]})
        table.attrs["skipped"] = found.skipped_message()
        repeat = first_repeat(table["listing_id"])
        if repeat:
            a, b = (found.paths[i].relative_to(listings).as_posix() for i in repeat[1:])
            raise HierError(f"listing_id {repeat[0]!r} repeats in {listings}: {a} and {b} (a folder's listing_id "
                            "is the file's path without its extension); rename one, or give a CSV "
                            "listing_id,image")
    elif listings.is_file():
        table = read_table(listings, "listings CSV", ["listing_id", "image"], AS_GIVEN["dtype"])
        reserved = [c for c in table.columns if str(c).startswith(PREFIX)]
        if reserved:
            raise HierError(f"{listings}: column {reserved[0]!r} uses the prefix {PREFIX!r}, which hier keeps for "
                            "its own columns; rename it")
        require_cells(table, ["listing_id", "image"], listings)
        repeat = first_repeat(table["listing_id"])
        if repeat:
            raise HierError(f"{listings}: listing_id {repeat[0]!r} repeats (rows {repeat[1] + 2} and {repeat[2] + 2})")
        table["image"] = [str((listings.parent / p).resolve()) for p in table["image"]]
        refuse_listed([Path(p) for p in table["image"]], listings)
    else:
        raise HierError(f"listings not found: {listings}")
    return table


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


def _embed_and_save(artifact_dir: Path, table: pd.DataFrame, progress, save, prepare=None):
    """Embed ``table`` unlocked, then, under the artifact's lock, ``save(embedded, prepared)`` if the
    artifact is still the one embedded with; embedded again when another command changed it meanwhile
    (``EMBED_TRIES`` times, then one error line, nothing saved). ``prepare(embedded)`` runs unlocked
    after each embedding (training a new index) with ``embed_listings``' result. Returns what ``save`` returns."""
    for _ in range(EMBED_TRIES):
        done = embed_listings(artifact_dir, table, progress)
        prepared = prepare(done) if prepare else None
        with fileio.locked(artifact_dir):
            if artifact.stamp(artifact_dir) == done.stamp:
                return save(done, prepared)
    raise HierError(f"{artifact_dir} changed while its listings were embedded, {EMBED_TRIES} times (another "
                    "command kept writing it); nothing was saved; run the command again when it is done")


def saved_gallery(artifact_dir: str | Path) -> Path:
    """ARTIFACT/gallery, or one line saying there is no index yet."""
    folder = Path(artifact_dir) / GALLERY
    if not (folder / "index.faiss").is_file():
        raise HierError(f"{artifact_dir} has no index; run `hier index build {artifact_dir} LISTINGS` first")
    return folder


def read_saved(folder: Path, artifact_dir, read):
    """``read()`` of one of the gallery's files; a missing, cut or foreign file is one line naming the
    rebuild, not a pandas or FAISS traceback."""
    try:
        return read()
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise HierError(f"{folder} is damaged ({str(e).splitlines()[0][:120]}); build it again with "
                        f"`hier index build {artifact_dir} LISTINGS`") from None


def saved_rows(artifact_dir: str | Path, columns: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Each shard's listings.csv (only ``columns``), under the lock, no index read; HierError without
    a gallery."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        meta = fileio.read_json(folder / "gallery.json") if (folder / "gallery.json").is_file() else {}
        return {name: read_saved(folder, artifact_dir, lambda: pd.read_csv(
                    shard_folder(folder, name) / "listings.csv", encoding="utf-8", usecols=columns, **AS_GIVEN))
                for name in (meta.get("shards") or {BASE: None})}


def saved_listing_ids(artifact_dir: str | Path) -> set[str]:
    """The listing_ids of the saved gallery, every shard's (one column read, under the lock)."""
    return {i for rows in saved_rows(artifact_dir, ["listing_id"]).values() for i in rows["listing_id"].astype(str)}


def refuse_clashes(artifact_dir: str | Path, table: pd.DataFrame) -> None:
    """Listings to add whose listing_id is in the saved gallery (any shard): one line, before any
    embedding."""
    clash = set(table["listing_id"].astype(str)) & saved_listing_ids(artifact_dir)
    if clash:
        raise HierError(f"listing {sorted(clash)[0]!r} is already in the index ({len(clash)} clashes); "
                        "remove it first (`hier index remove`) or give it another listing_id")


def _table(listings: str | Path | pd.DataFrame) -> pd.DataFrame:
    return listings if isinstance(listings, pd.DataFrame) else read_listings(Path(listings))


def build(artifact_dir: str | Path, listings: str | Path | pd.DataFrame, kind: str = "flat",
          progress=None, parts: dict[str, np.ndarray] | None = None) -> Gallery:
    """Embed listing photos (a folder, a CSV or ``read_listings``' table) and (re)build ARTIFACT/gallery
    (one shard, or the rows ``parts`` names per shard); the embedding and the index's training run
    unlocked, the save under the lock."""
    factory_string(kind, 1)                   # an unknown kind fails before any work
    table = _table(listings)
    check_size(kind, len(table))              # so do too few images to train it

    def save(_, gallery: Gallery) -> Gallery:
        gallery.save(artifact_dir)
        return gallery
    return _embed_and_save(Path(artifact_dir), table, progress, save,
                           prepare=lambda e: Gallery.build(e.vectors, e.rows, kind, e.whitening, e.fingerprint,
                                                           e.labels_digest, parts=parts))


def rebuild(artifact_dir: str | Path, kind: str | None = None, progress=None) -> Gallery:
    """Embed the gallery's listings again with the artifact's weights of now (after ``hier train
    --resume``), keeping the sellers' columns, the shards and the kind unless ``kind`` is given. The
    listing photos must still exist: a missing one is refused (one line) before any embedding."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        shards = saved_rows(artifact_dir)
        meta = fileio.read_json(folder / "gallery.json") if (folder / "gallery.json").is_file() else {}
    listings = pd.concat(shards.values(), ignore_index=True)
    if "image" not in listings:
        raise HierError(f"{folder}/listings.csv has no image column (a gallery of an older hier): build it "
                        f"again from the listings, `hier index build {artifact_dir} LISTINGS`")
    refuse_listed([Path(p) for p in listings["image"]], folder / "listings.csv")
    if not len(listings):
        raise HierError(f"{folder} lists no listings (all removed); build it from listings with "
                        f"`hier index build {artifact_dir} LISTINGS`")
    table = listings.drop(columns=[c for c in listings.columns if str(c).startswith(PREFIX)])
    starts = np.cumsum([0] + [len(rows) for rows in shards.values()])
    parts = {name: np.arange(a, b) for name, a, b in zip(shards, starts, starts[1:])}
    return build(artifact_dir, table, kind or meta.get("kind", "flat"), progress, parts)


def add(artifact_dir: str | Path, listings: str | Path | pd.DataFrame, progress=None,
        shard: str | None = None) -> tuple[int, Gallery]:
    """Add listings to the existing index, into ``shard`` (``shard_name``; default ``BASE``; a new one
    starts as the trained empty index), ids of the others as they are. Clashing listing_ids (in any
    shard) are refused before any embedding; only that shard is read, extended and saved under the
    lock, after the unlocked embedding (so two adds at once both land). Returns the gallery with that
    shard read (the others listed)."""
    shard = shard_name(shard)
    table = _table(listings)
    refuse_clashes(artifact_dir, table)

    def save(done: Embedded, _) -> Gallery:
        refuse_clashes(artifact_dir, done.rows)            # again: another add may have landed meanwhile
        gallery = Gallery.load(artifact_dir, only=[shard])
        if gallery.labels_digest != done.labels_digest:     # old rows labelled by another head: mixed
            gallery.labels_digest = None
        gallery.add(done.vectors, done.rows, shard)
        gallery.save(artifact_dir, only=[shard])
        return gallery
    return len(table), _embed_and_save(Path(artifact_dir), table, progress, save)


def remove(artifact_dir: str | Path, ids: list[str]) -> tuple[int, Gallery]:
    """Remove listings by listing_id (only the shards holding them are read and written)."""
    wanted = set(map(str, ids))
    with fileio.locked(artifact_dir):
        rows = saved_rows(artifact_dir, ["listing_id"])
        holding = [n for n, r in rows.items() if r["listing_id"].astype(str).isin(wanted).any()]
        gallery = Gallery.load(artifact_dir, only=holding)
        n = gallery.remove(ids)
        gallery.save(artifact_dir, only=holding)
    return n, gallery


def drop(artifact_dir: str | Path, shard: str) -> tuple[int, Gallery]:
    """Forget a whole shard (its listings expired): gallery.json stops listing it (one atomic rename,
    no index read or written), then its folder is removed. ``BASE`` is emptied instead (read and
    written). Returns the rows dropped."""
    with fileio.locked(artifact_dir):
        gallery = Gallery.load(artifact_dir, only=[shard] if shard == BASE else [])
        n = gallery.drop(shard)
        gallery.save(artifact_dir, only=[BASE] if shard == BASE else [])
    return n, gallery


def merge(artifact_dir: str | Path, shards: list[str], into: str) -> tuple[int, Gallery]:
    """Compact shards into one (``Gallery.merge``): only those and ``into`` are read and written, under
    the lock."""
    into = shard_name(into)
    with fileio.locked(artifact_dir):
        gallery = Gallery.load(artifact_dir, only=[*shards, into])
        n = gallery.merge(shards, into)
        written = [into] + ([BASE] if BASE in shards and into != BASE else [])
        gallery.save(artifact_dir, only=written)
    return n, gallery


def shard_counts(artifact_dir: str | Path) -> dict[str, int]:
    """Each shard's listings, from gallery.json (no index read)."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        meta = fileio.read_json(folder / "gallery.json") if (folder / "gallery.json").is_file() else {}
    listed = meta.get("shards")
    if not listed:
        return {name: len(rows) for name, rows in saved_rows(artifact_dir, ["listing_id"]).items()}
    return {name: int(n or 0) for name, n in listed.items()}


def faiss_gpus() -> int:
    """GPUs faiss-gpu sees (0 with the CPU build)."""
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def placement(kind: str, gpus: int, purpose: str) -> str:
    """Where a gallery's index lives (``cpu`` | ``gpu``) for ``purpose`` (``search`` | ``edit``): edits
    and saves on the CPU (GPU indexes have no ``remove_ids`` and FAISS writes CPU indexes), HNSW always
    on the CPU (FAISS has no GPU HNSW), pq too (its IVFPQ of 6-bit codes never ran on a GPU here, and its filtered
    searches need the CPU's ID selectors), searches on the GPUs when there are any. Pure: tested on CPU."""
    if purpose not in ("search", "edit"):
        raise ValueError(f"purpose is search or edit, not {purpose!r}")
    return "gpu" if purpose == "search" and gpus > 0 and kind not in ("hnsw", "pq") else "cpu"
