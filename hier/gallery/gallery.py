"""The ``Gallery``: a gallery's shards in memory, one metadata row per vector (``hier_id`` is the FAISS
id), built and edited here (add, remove, drop, merge), searched through ``search`` and ``results``,
saved and loaded through ``store``."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from hier.errors import HierError
from hier.gallery import results as result_rows
from hier.gallery import search as searching
from hier.gallery import store
from hier.gallery.gpu import faiss_gpus, placement
from hier.gallery.introspect import index_bytes, ivf_of, kind_of
from hier.gallery.joining import joined, merge_into, stacked, sync_ntotal
from hier.gallery.kinds import EF_SEARCH, NPROBE, check_size, factory_string, training_sample
from hier.gallery.listings import ID, as_numbers, number_columns
from hier.gallery.shards import BASE, Shard
from hier.gallery.vectors import whole
from hier.gallery.whitening import transformed, unwhitening, whitened, whitening_of


class Gallery:
    """FAISS indexes (shards, ``hier.gallery.shards``) + one metadata row per vector (column ``hier_id``
    is the FAISS id)."""

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
        self.gpu = None                    # the GPU copy searches run on (``on_gpus``)
        self._changed()
        self.next_id = next_id if next_id is not None else \
            int(self.listings[ID].max()) + 1 if len(self.listings) else 0

    def _changed(self) -> None:
        """After an edit: the joined listings, the IndexShards and the re-rank lookup are made again when
        next needed."""
        self._listings = self._joined = self._lookup = self._numbers = None

    def loaded(self) -> list[Shard]:
        """The shards read (the others are listed, not read)."""
        return [s for s in self.shards.values() if s.index is not None]

    @property
    def listings(self) -> pd.DataFrame:
        """Every read shard's listings, in shard order (the same object until the next edit)."""
        if self._listings is None:
            parts = [s.listings for s in self.loaded()]
            self._listings = parts[0] if len(parts) == 1 else \
                pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({ID: pd.Series(dtype=np.int64)})
        return self._listings

    def number_columns(self) -> dict[str, type]:
        """``listings.number_columns`` of every listing (found once until the next edit)."""
        if self._numbers is None:
            self._numbers = number_columns(self.listings)
        return self._numbers

    @property
    def index(self) -> faiss.Index:
        """The one index searches run on: the only shard itself; for the IVF kinds, one IVF index over
        every shard's inverted lists (``stacked``: one search, as if the gallery were one index); for the
        others, FAISS's ``IndexShards`` over them (``successive_ids=False``: each shard answers with its
        own ids, unique across the gallery; it searches every shard and merges their top k)."""
        loaded = [s.index for s in self.loaded()]
        if len(loaded) == 1:
            return loaded[0]
        if self._joined is None:
            self._joined = stacked(loaded, self.empty_index()) if ivf_of(loaded[0]) is not None else joined(loaded)
        if isinstance(self._joined, faiss.IndexShards):
            self._joined.syncWithSubIndexes()          # ntotal after an add to a shard
        else:
            sync_ntotal(self._joined, sum(i.ntotal for i in loaded))
        return self._joined

    def on_gpus(self, gpus: int | None = None) -> "Gallery":
        """Search on the GPUs when ``placement`` says so (edits and saves stay on the CPU shards)."""
        gpus = faiss_gpus() if gpus is None else gpus
        if placement(self.kind, gpus, "search") == "gpu":
            copies = [faiss.index_cpu_to_all_gpus(s.index) for s in self.loaded()]
            self.gpu = copies[0] if len(copies) == 1 else joined(copies)
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
            index = faiss.deserialize_index(np.frombuffer(index_bytes(self.loaded()[0].index), dtype=np.uint8))
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
        return transformed(self.loaded()[0].index if self.loaded() else self.empty_index(), vectors)

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
        for s in self.loaded():
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
                merge_into(dest.index, src.index, src.listings[ID].to_numpy(np.int64))
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

    # --- searches: hier.gallery.search and hier.gallery.results -----------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, ef_search: int | None = None,
               allowed: np.ndarray | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, FAISS ids), each (n_queries, k): ``hier.gallery.search.search``."""
        return searching.search(self, queries, k, nprobe, ef_search, allowed, rerank)

    def _search(self, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None,
                allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search without the pq kind's re-rank (``codes_search``)."""
        return searching.codes_search(self, queries, k, nprobe, ef_search, allowed)

    def _reranks(self) -> bool:
        return searching.reranks(self)

    def results(self, queries: np.ndarray, k: int = 10, where=None, labels=None, labels_key=None,
                nprobe: int | None = None) -> list[pd.DataFrame]:
        """Metadata rows of the nearest listings per query, best first: ``hier.gallery.results.results``;
        the sellers' number columns as numbers (``listings.number_columns``), the others as written."""
        numbers = self.number_columns()
        return [as_numbers(rows, numbers) for rows in result_rows.results(self, queries, k, where, labels, labels_key,
                                                                          nprobe)]

    def labelled(self, labels, key=None) -> pd.DataFrame:
        """Every listing labelled by ``labels`` of its stored vector: ``hier.gallery.results.labelled``."""
        return result_rows.labelled(self, labels, key)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The embeddings stored under FAISS ``ids``, as they went in (a whitened gallery keeps
        ``normalise(z @ W)``; ``z`` is unit-length, so ``normalise(y @ W^-1)`` gives it back). The pq kind
        gives back its re-rank vectors (float16), renormalised; without them (a gallery of an older hier)
        its codes' reconstruction, within the PQ's error of the embedding (docs/benchmarks/gallery.md)."""
        ids = np.asarray(ids, dtype=np.int64)
        loaded = self.loaded()
        if self._reranks():
            return self._unwhitened(loaded[0].index, searching.exact_of(self, ids))
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
            self._unwhiten = unwhitening(w[0])
        z = y @ self._unwhiten
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    # --- persistence: hier.gallery.store ------------------------------------------------------------------
    def save(self, artifact_dir: str | Path, only: list[str] | None = None) -> None:
        """gallery.json, the template and the shards ``only`` names, one atomic set: ``store.save``."""
        store.save(self, artifact_dir, only)

    def _index_bytes(self, name: str = BASE) -> bytes:
        return index_bytes(self.shards[name].index)

    @classmethod
    def load(cls, artifact_dir: str | Path, only: list[str] | None = None) -> "Gallery":
        """The saved gallery on the CPU, checked against the artifact's weights: ``store.load``."""
        return store.load(cls, artifact_dir, only)
