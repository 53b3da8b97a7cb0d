"""Several shards' FAISS indexes as one: searched together (``stacked`` inverted lists for the IVF kinds,
FAISS's ``IndexShards`` for the others) or merged into one (``merge_into``), with their own ids."""
from __future__ import annotations

import faiss
import numpy as np

from hier.gallery.introspect import ivf_of
from hier.gallery.whitening import whitening_of


def joined(indexes: list[faiss.Index]) -> faiss.Index:
    """FAISS's ``IndexShards`` over ``indexes`` keeping their own ids, searched one after another (a
    thread per shard was not measured). Each shard runs its whole search, coarse quantizer included:
    a query costs about one search per shard (docs/benchmarks/gallery.md), so shards are best kept few
    (``merge``)."""
    out = faiss.IndexShards(indexes[0].d, False, False)
    for index in indexes:
        out.add_shard(index)               # faiss's Python layer keeps each shard referenced
    return out


def stacked(indexes: list[faiss.Index], view: faiss.Index) -> faiss.Index:
    """``view`` (the gallery's trained empty index: the shards' coarse quantizer and codebooks) reading
    every shard's inverted lists through FAISS's ``HStackInvertedLists`` (nothing copied; a shard's
    later adds show through). A query is one coarse quantization and one scan of the probed lists,
    where ``IndexShards`` runs the whole search once per shard (docs/benchmarks/gallery.md, sharded
    galleries); ids, ``nprobe`` and selectors act as on one index."""
    ivf = ivf_of(view)
    lists = faiss.InvertedListsPtrVector()
    for index in indexes:
        lists.push_back(ivf_of(index).invlists)
    hstack = faiss.HStackInvertedLists(lists.size(), lists.data())
    ivf.replace_invlists(hstack, False)
    # the C++ view points into these: held as FAISS's Python layer holds its own (``referenced_objects``)
    view.referenced_objects = [*getattr(view, "referenced_objects", []), indexes, lists, hstack]
    sync_ntotal(view, sum(i.ntotal for i in indexes))
    return view


def sync_ntotal(index: faiss.Index, ntotal: int) -> None:
    """Set ``ntotal`` on ``index`` and every wrapper inside it (each counts what its inner index holds)."""
    outer = faiss.downcast_index(index)
    while True:
        outer.ntotal = ntotal
        if not isinstance(outer, faiss.IndexPreTransform):
            break
        outer = faiss.downcast_index(outer.index)


def merge_into(dest: faiss.Index, src: faiss.Index, ids: np.ndarray) -> None:
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
    sync_ntotal(dest, (ivf_d if ivf_d is not None and ivf_s is not None else inner_d).ntotal)   # the wrappers'
