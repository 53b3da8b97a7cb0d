"""Similar-listing search: a FAISS index of listing embeddings plus a metadata table.

Embeddings are L2-normalised, so inner product is cosine similarity. Each listing image gets a stable
int64 id (``add_with_ids``), so removing listings never renumbers the rest. The index lives in
``ARTIFACT/gallery/`` (``index.faiss`` + ``listings.csv``) and moves with the artifact.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from hier.artifact import atomic_write
from hier.errors import HierError

GALLERY = "gallery"
KINDS = ("flat", "ivf", "hnsw")


def factory_string(kind: str, n: int) -> str:
    """FAISS ``index_factory`` string: exact flat search by default, IVF or HNSW for large galleries."""
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "ivf":
        # 4 * sqrt(n) lists, at most 4096, and at least 39 training points per list (FAISS's minimum)
        return f"IVF{max(1, min(4096, int(4 * np.sqrt(n)), n // 39))},Flat"
    if kind == "hnsw":
        return "IDMap2,HNSW32"
    raise HierError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


class Gallery:
    """FAISS index + one metadata row per vector (column ``id`` is the FAISS id)."""

    def __init__(self, index: faiss.Index, listings: pd.DataFrame, kind: str):
        self.index, self.listings, self.kind = index, listings.reset_index(drop=True), kind
        self.nprobe = 16

    @classmethod
    def build(cls, vectors: np.ndarray, listings: pd.DataFrame, kind: str = "flat") -> "Gallery":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(vectors.shape[1], factory_string(kind, len(vectors)), faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            if len(vectors) < index.nlist:
                raise HierError(f"--index ivf needs at least {index.nlist} images to train; use flat")
            index.train(vectors)
        gallery = cls(index, listings.iloc[:0].assign(id=pd.Series(dtype=np.int64)), kind)
        gallery.add(vectors, listings)
        return gallery

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray, listings: pd.DataFrame) -> None:
        clash = set(listings["listing_id"].astype(str)) & set(self.listings.get("listing_id", pd.Series()).astype(str))
        if clash:
            raise HierError(f"listing {sorted(clash)[0]!r} is already in the index ({len(clash)} clashes)")
        start = int(self.listings["id"].max()) + 1 if len(self.listings) else 0
        ids = np.arange(start, start + len(vectors), dtype=np.int64)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.listings = pd.concat([self.listings, listings.assign(id=ids)], ignore_index=True)

    def remove(self, listing_ids: list[str]) -> int:
        keep = ~self.listings["listing_id"].astype(str).isin(set(map(str, listing_ids)))
        unknown = set(map(str, listing_ids)) - set(self.listings["listing_id"].astype(str))
        if unknown:
            raise HierError(f"listing {sorted(unknown)[0]!r} is not in the index")
        if self.kind == "hnsw":
            raise HierError("an HNSW index cannot remove vectors; rebuild it with `hier index build`")
        removed = self.index.remove_ids(self.listings.loc[~keep, "id"].to_numpy(np.int64))
        self.listings = self.listings[keep].reset_index(drop=True)
        return int(removed)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, FAISS ids), each (n_queries, k); id -1 where fewer than k vectors exist."""
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = self.nprobe
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def results(self, queries: np.ndarray, k: int = 10, where=None) -> list[pd.DataFrame]:
        """Metadata rows of the nearest listings per query, best first; ``where(rows)`` filters
        (e.g. same brand), searching deeper until k rows pass or the gallery is exhausted."""
        by_id = self.listings.set_index("id")
        out = []
        for q in np.atleast_2d(queries):
            depth = k
            while True:
                sims, ids = self.search(q[None], min(depth, len(self)))
                rows = by_id.loc[ids[0][ids[0] >= 0]].assign(similarity=sims[0][ids[0] >= 0]).reset_index()
                if where is not None:
                    rows = rows[where(rows)]
                if len(rows) >= k or depth >= len(self):
                    break
                depth *= 4
            out.append(rows.head(k).reset_index(drop=True))
        return out

    # --- persistence --------------------------------------------------------------------------------
    def save(self, artifact_dir: str | Path) -> None:
        folder = Path(artifact_dir) / GALLERY
        atomic_write(folder / "index.faiss", lambda p: faiss.write_index(to_cpu(self.index), str(p)))
        atomic_write(folder / "listings.csv", lambda p: self.listings.assign(kind=self.kind).to_csv(p, index=False))

    @classmethod
    def load(cls, artifact_dir: str | Path) -> "Gallery":
        folder = Path(artifact_dir) / GALLERY
        if not (folder / "index.faiss").is_file():
            raise HierError(f"{artifact_dir} has no index; run `hier index build {artifact_dir} LISTINGS` first")
        listings = pd.read_csv(folder / "listings.csv", dtype={"listing_id": str})
        kind = listings.pop("kind").iloc[0] if len(listings) else "flat"
        return cls(to_gpu(faiss.read_index(str(folder / "index.faiss"))), listings, kind)


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move the index to all GPUs when faiss-gpu sees any; unchanged on CPU builds."""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """FAISS writes CPU indexes only; a GPU copy is brought back first."""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        try:
            return faiss.index_gpu_to_cpu(index)
        except (RuntimeError, TypeError):   # already a CPU index
            return index
    return index
