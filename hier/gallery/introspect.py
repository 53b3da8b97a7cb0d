"""What a FAISS index of the gallery is made of: its IVF, its kind (one of ``KINDS``), the per-call search
parameters its structure takes, and its bytes as saved."""
from __future__ import annotations

import faiss

from hier.gallery.whitening import whitening_of


def ivf_of(index: faiss.Index):
    """The IndexIVF inside ``index`` (behind any pre-transform), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


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
