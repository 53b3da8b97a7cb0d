"""Result rows: the listings a search finds, best first, filtered by ``where`` inside the one search and
labelled by the artifact's head of now (``labels``) rather than as they were indexed.
``Gallery.results`` and ``Gallery.labelled`` are these; they read the gallery's listings and caches."""
from __future__ import annotations

import numpy as np
import pandas as pd

from hier.errors import HierError
from hier.gallery.listings import BRAND, CLASS, ID, MODEL, SIMILARITY

LABEL_CHUNK = 65_536                   # listings labelled per call of ``labels`` (memory of one chunk)


def by_id(gallery) -> pd.DataFrame:
    """The listings indexed by FAISS id, built once per version of the table (a 100k-row
    ``set_index`` per query would cost more than the search), hier's labels as categories (a filter's
    ``== brand`` over 1M listings: 0.3 ms, not 12)."""
    if getattr(gallery, "_by_id_of", None) is not gallery.listings:
        gallery._by_id_of, gallery._by_id_frame = gallery.listings, _categories(gallery.listings.set_index(ID))
    return gallery._by_id_frame


def labelled(gallery, labels, key=None) -> pd.DataFrame:
    """Every listing with the columns ``labels(vectors)`` gives of its stored vector (the head of now),
    indexed by FAISS id; kept for the next call with the same ``key`` on this version of the table
    (None: computed every call). An index that cannot give its vectors back: the labels as indexed."""
    cached = getattr(gallery, "_labelled", None)
    if key is not None and cached is not None and cached[0] is gallery.listings and cached[1] == key:
        return cached[2]
    ids = gallery.listings[ID].to_numpy(np.int64)
    try:
        parts = [labels(gallery.vectors(ids[s:s + LABEL_CHUNK])) for s in range(0, len(ids), LABEL_CHUNK)]
        columns = {c: np.concatenate([np.asarray(p[c], dtype=object) for p in parts]) for c in parts[0]} \
            if parts else {}
        frame = _categories(gallery.listings.assign(**columns).set_index(ID))
    except RuntimeError:
        frame = by_id(gallery)
    if key is not None:
        gallery._labelled = (gallery.listings, key, frame)
    return frame


def results(gallery, queries: np.ndarray, k: int = 10, where=None, labels=None, labels_key=None,
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
    if not len(gallery):                 # every listing removed: nothing is near
        return [gallery.listings.iloc[:0].assign(**{SIMILARITY: pd.Series(dtype=np.float32)}) for _ in queries]
    if where is not None and gallery.gpu is not None:
        return [deepening(gallery, q, k, where, labels, nprobe) for q in queries]
    rows_by_id, allowed = by_id(gallery), None
    if where is not None:
        rows_by_id = labelled(gallery, labels, labels_key) if labels is not None else rows_by_id
        allowed = rows_by_id.index.to_numpy(np.int64)[np.asarray(where(rows_by_id), dtype=bool)]
        if not len(allowed):
            return [_plain(rows_by_id.iloc[:0].reset_index()).assign(**{SIMILARITY: pd.Series(dtype=np.float32)})
                    for _ in queries]
    sims, ids = gallery.search(queries, min(k, len(gallery) if allowed is None else len(allowed)), nprobe,
                               allowed=allowed)
    found = [row[row >= 0] for row in ids]
    rows = [_plain(rows_by_id.loc[f].assign(**{SIMILARITY: s[r >= 0]}).reset_index())
            for f, s, r in zip(found, sims, ids)]
    if labels is not None and where is None:       # the candidates alone labelled, in one call
        every = np.concatenate(found)
        if len(every):
            try:
                columns = labels(gallery.vectors(every))
            except RuntimeError:                   # an index that cannot give its vectors back
                columns = None
            if columns is not None:
                starts = np.cumsum([0] + [len(f) for f in found])
                rows = [r.assign(**{c: list(v[a:b]) for c, v in columns.items()})
                        for r, a, b in zip(rows, starts, starts[1:])]
    return rows


def deepening(gallery, q: np.ndarray, k: int, where, labels, nprobe) -> pd.DataFrame:
    """One query's k rows that pass ``where``, searching deeper until k pass or the gallery is
    exhausted (the GPUs' way: they take no ID selector)."""
    rows_by_id, depth = by_id(gallery), k
    while True:
        sims, ids = gallery.search(q[None], min(depth, len(gallery)), nprobe)
        found = ids[0][ids[0] >= 0]
        rows = _plain(rows_by_id.loc[found].assign(**{SIMILARITY: sims[0][ids[0] >= 0]}).reset_index())
        if labels is not None and len(found):
            try:
                rows = rows.assign(**labels(gallery.vectors(found)))
            except RuntimeError:     # an index that cannot give its vectors back: labels as indexed
                labels = None
        rows = rows[where(rows)]
        if len(rows) >= k or depth >= len(gallery):
            return rows.head(k).reset_index(drop=True)
        depth *= 4


def _categories(frame: pd.DataFrame) -> pd.DataFrame:
    """hier's label columns as pandas categories (in the in-memory frames filters run on)."""
    return frame.astype({c: "category" for c in (CLASS, BRAND, MODEL) if c in frame})


def _plain(rows: pd.DataFrame) -> pd.DataFrame:
    """Result rows with hier's label columns as plain text again (as they were read)."""
    return rows.astype({c: object for c in (CLASS, BRAND, MODEL) if c in rows})
