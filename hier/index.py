"""Similar-listing search: a FAISS index of listing embeddings plus a metadata table.

Embeddings are L2-normalised, so inner product is cosine similarity. An artifact served by its class
statistics searches in the *whitened* embedding (``S^-1/2 z``, renormalised, with ``S`` the base
classes' shared within-class covariance): directions along which photos of one car differ count less,
those that tell cars apart count more (README, enrollment benchmark: Recall@1 on unseen classes). The
transform is inside the FAISS index (``IndexPreTransform``), so queries go in as plain embeddings and
an older gallery keeps answering as it was built. Each listing image gets a stable
int64 id (``add_with_ids``), so removing listings never renumbers the rest. The index lives in
``ARTIFACT/gallery/`` (``index.faiss`` + ``listings.csv`` + ``gallery.json``) and moves with the artifact.
The seller's columns are kept as given; hier's own (FAISS id, predicted class/brand/model, similarity)
are named ``hier_*``, a prefix listings may not use.

``build`` and ``add`` embed the photos *outside* the artifact's lock (a service reading the artifact
meanwhile is never stalled by a long embedding) and hold it only to check and save: the artifact's
weights, taxonomy and config must still be those the photos were embedded with (else they are embedded
again), and ``add`` reads, extends and saves the gallery under the lock, so two ``hier index add`` at
once both land.
"""
from __future__ import annotations

import json
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
from hier.metrics import path_of
from hier.engine.predictor import artifact_predictor, device

KINDS = ("flat", "ivf", "hnsw")
PREFIX = "hier_"                       # hier's own listing columns; reserved in users' listings
ID, CLASS, BRAND, MODEL, SIMILARITY = (PREFIX + c for c in ("id", "class", "brand", "model", "similarity"))
# Sellers' cells come back as written, as text ("01234" stays "01234"): only an empty cell is missing
# ("n/a", "NA", "null" stay text).
AS_GIVEN = dict(dtype=str, keep_default_na=False, na_values=[""])
EMBED_TRIES = 3                        # embeddings redone when the artifact changed meanwhile, then refused
SEARCH_SHRINK = 0.5                    # covariance shrinkage of the search whitening (measured: README)


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
    """FAISS index + one metadata row per vector (column ``hier_id`` is the FAISS id)."""

    def __init__(self, index: faiss.Index, listings: pd.DataFrame, kind: str, fingerprint: str | None = None):
        """``index`` on the CPU (where it is edited and saved); ``fingerprint``: the artifact weights'
        that embedded its vectors (None: a gallery from before it was recorded)."""
        self.index, self.listings, self.kind = index, listings.reset_index(drop=True), kind
        self.fingerprint = fingerprint
        self.nprobe = 16
        self.searcher = index              # the copy searches run on (``on_gpus``)
        if kind == "ivf":                  # ids -> vectors (``vectors``) and remove_ids without a scan
            faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)

    def on_gpus(self, gpus: int | None = None) -> "Gallery":
        """Search on the GPUs when ``placement`` says so (edits and saves stay on the CPU index)."""
        gpus = faiss_gpus() if gpus is None else gpus
        if placement(self.kind, gpus, "search") == "gpu":
            self.searcher = faiss.index_cpu_to_all_gpus(self.index)
        return self

    @classmethod
    def build(cls, vectors: np.ndarray, listings: pd.DataFrame, kind: str = "flat",
              whitening: np.ndarray | None = None, fingerprint: str | None = None) -> "Gallery":
        """A new gallery of ``vectors``; with ``whitening`` (D x D) it searches in ``normalise(z @ W)``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.index_factory(vectors.shape[1], factory_string(kind, len(vectors)), faiss.METRIC_INNER_PRODUCT)
        if whitening is not None:
            index = whitened(index, whitening)
        if not index.is_trained:
            lists = faiss.extract_index_ivf(index).nlist
            if len(vectors) < lists:
                raise HierError(f"--index ivf needs at least {lists} images to train; use flat")
            index.train(vectors)
        gallery = cls(index, listings.iloc[:0].assign(**{ID: pd.Series(dtype=np.int64)}), kind, fingerprint)
        gallery.add(vectors, listings)
        return gallery

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray, listings: pd.DataFrame) -> None:
        clash = set(listings["listing_id"].astype(str)) & set(self.listings.get("listing_id", pd.Series()).astype(str))
        if clash:
            raise HierError(f"listing {sorted(clash)[0]!r} is already in the index ({len(clash)} clashes)")
        start = int(self.listings[ID].max()) + 1 if len(self.listings) else 0
        ids = np.arange(start, start + len(vectors), dtype=np.int64)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.listings = pd.concat([self.listings, listings.assign(**{ID: ids})], ignore_index=True)

    def remove(self, listing_ids: list[str]) -> int:
        keep = ~self.listings["listing_id"].astype(str).isin(set(map(str, listing_ids)))
        unknown = set(map(str, listing_ids)) - set(self.listings["listing_id"].astype(str))
        if unknown:
            raise HierError(f"listing {sorted(unknown)[0]!r} is not in the index")
        if self.kind == "hnsw":
            raise HierError("an HNSW index cannot remove vectors; rebuild it with `hier index build`")
        removed = self.index.remove_ids(self.listings.loc[~keep, ID].to_numpy(np.int64))
        self.listings = self.listings[keep].reset_index(drop=True)
        return int(removed)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, FAISS ids), each (n_queries, k); id -1 where fewer than k vectors exist."""
        if self.kind == "ivf":
            space = faiss.ParameterSpace() if self.searcher is self.index else faiss.GpuParameterSpace()
            space.set_index_parameter(self.searcher, "nprobe", self.nprobe)
        return self.searcher.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The embeddings stored under FAISS ``ids``, as they went in (a whitened gallery keeps
        ``normalise(z @ W)``; ``z`` is unit-length, so ``normalise(y @ W^-1)`` gives it back)."""
        ids = np.asarray(ids, dtype=np.int64)
        index = faiss.downcast_index(self.index)
        if not isinstance(index, faiss.IndexPreTransform):
            return index.reconstruct_batch(ids)
        y = faiss.downcast_index(index.index).reconstruct_batch(ids)
        if getattr(self, "_unwhiten", None) is None:
            linear = faiss.downcast_VectorTransform(index.chain.at(0))
            a = faiss.vector_to_array(linear.A).reshape(linear.d_out, linear.d_in)     # y = z @ a.T
            self._unwhiten = np.linalg.inv(a.T).astype(np.float32)
        z = y @ self._unwhiten
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def _by_id(self) -> pd.DataFrame:
        """The listings indexed by FAISS id, built once per version of the table (a 100k-row
        ``set_index`` per query would cost more than the search)."""
        if getattr(self, "_by_id_of", None) is not self.listings:
            self._by_id_of, self._by_id_frame = self.listings, self.listings.set_index(ID)
        return self._by_id_frame

    def results(self, queries: np.ndarray, k: int = 10, where=None, labels=None) -> list[pd.DataFrame]:
        """Metadata rows of the nearest listings per query, best first. ``labels(vectors)``: hier's
        class/brand/model columns of the candidates from their stored vectors, by the artifact's head of
        now (a class enrolled after indexing is found), instead of the ones written when they were
        indexed. ``where(rows)`` filters (e.g. same brand), searching deeper until k rows pass or the
        gallery is exhausted."""
        if k < 1:
            raise HierError(f"k must be at least 1, not {k}")
        if not len(self):                    # every listing removed: nothing is near
            return [self.listings.iloc[:0].assign(**{SIMILARITY: pd.Series(dtype=np.float32)})
                    for _ in np.atleast_2d(queries)]
        by_id = self._by_id()
        out = []
        for q in np.atleast_2d(queries):
            depth = k
            while True:
                sims, ids = self.search(q[None], min(depth, len(self)))
                found = ids[0][ids[0] >= 0]
                rows = by_id.loc[found].assign(**{SIMILARITY: sims[0][ids[0] >= 0]}).reset_index()
                if labels is not None and len(found):
                    try:
                        rows = rows.assign(**labels(self.vectors(found)))
                    except RuntimeError:     # an index that cannot give its vectors back: labels as indexed
                        labels = None
                if where is not None:
                    rows = rows[where(rows)]
                if len(rows) >= k or depth >= len(self):
                    break
                depth *= 4
            out.append(rows.head(k).reset_index(drop=True))
        return out

    # --- persistence --------------------------------------------------------------------------------
    def save(self, artifact_dir: str | Path) -> None:
        """Index, listings and kind land together (one atomic set), under the artifact's lock."""
        folder = Path(artifact_dir) / GALLERY
        meta = json.dumps({"kind": self.kind, "fingerprint": self.fingerprint})
        with fileio.locked(artifact_dir):
            fileio.atomic_write_all({
                # bytes written by Python, not FAISS's own writer: a full disk then raises OSError(ENOSPC)
                folder / "index.faiss": lambda p: p.write_bytes(faiss.serialize_index(self.index).tobytes()),
                folder / "listings.csv": lambda p: self.listings.to_csv(p, index=False, encoding="utf-8"),
                folder / "gallery.json": lambda p: p.write_text(meta, encoding="utf-8")})

    @classmethod
    def load(cls, artifact_dir: str | Path) -> "Gallery":
        """The saved gallery on the CPU (``on_gpus`` for serving), refused when the artifact's weights
        are no longer those that embedded it (``hier train --resume`` since): its vectors would not be
        comparable with new queries."""
        folder = saved_gallery(artifact_dir)
        with fileio.locked(artifact_dir):
            listings = read_saved(folder, artifact_dir, lambda: pd.read_csv(folder / "listings.csv", encoding="utf-8",
                                                                               **AS_GIVEN))
            index = read_saved(folder, artifact_dir, lambda: faiss.read_index(str(folder / "index.faiss")))
            meta = fileio.read_json(folder / "gallery.json") if (folder / "gallery.json").is_file() else None
            weights = artifact.read_config(artifact_dir).get("fingerprint")
        if meta is None and ID not in listings and "kind" in listings:
            # written before hier_* columns and gallery.json: id/class/brand/model/kind were hier's
            meta = {"kind": listings.pop("kind").iloc[0] if len(listings) else "flat"}
            listings = listings.rename(columns={c: PREFIX + c for c in ("id", "class", "brand", "model")})
        if not isinstance(meta, dict) or meta.get("kind") not in KINDS or ID not in listings:
            raise HierError(f"{folder} is damaged (gallery.json {'missing' if meta is None else 'unreadable'}, or "
                            f"listings.csv without {ID}); build it again with `hier index build {artifact_dir} LISTINGS`")
        if meta.get("fingerprint") and weights and meta["fingerprint"] != weights:
            raise HierError(f"{artifact_dir}/{GALLERY} was embedded by other weights than the artifact's (trained "
                            f"again since?); re-embed its listings with `hier index rebuild {artifact_dir}`")
        if not meta.get("fingerprint"):
            warnings.warn(f"{artifact_dir}/{GALLERY} was built by an older hier, which did not record the weights it "
                          f"embedded with; if the artifact was trained again since, `hier index rebuild {artifact_dir}`",
                          HierWarning, stacklevel=2)
        ids = pd.to_numeric(listings[ID], errors="coerce")
        if ids.isna().any():
            raise HierError(f"{folder}/listings.csv has a {ID} that is not a number; build it again with "
                            f"`hier index build {artifact_dir} LISTINGS`")
        return cls(index, listings.assign(**{ID: ids.astype(np.int64)}), meta["kind"], meta.get("fingerprint"))


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


def embed_listings(artifact_dir: Path, table: pd.DataFrame, progress=None) -> Embedded:
    """The listing photos embedded and answered; only the model's load holds the artifact's lock, the
    embedding runs unlocked."""
    artifact_dir = Path(artifact_dir)
    with fileio.locked(artifact_dir):              # the weights and their export's config, one version
        _, net, taxonomy = artifact.snapshot(artifact_dir, device())
        predictor = artifact_predictor(artifact_dir, net)
        stamp = artifact.stamp(artifact_dir)       # after an export on first use
    out = predictor([Path(p) for p in table["image"]], progress, keep=("embedding", "answer"))
    brand, model, fine = path_of(out["answer"], taxonomy)    # the answer, as `similar --same-brand`
    rows = table.assign(**{CLASS: [taxonomy.classes[i] for i in fine], BRAND: [taxonomy.brands[i] for i in brand],
                           MODEL: [taxonomy.models[i] for i in model]})
    return Embedded(out["embedding"], rows, stamp, search_whitening(net), net.fingerprint())


def _embed_and_save(artifact_dir: Path, table: pd.DataFrame, progress, save, prepare=None):
    """Embed ``table`` unlocked, then, under the artifact's lock, ``save(vectors, table, prepared)`` if the
    artifact is still the one embedded with; embedded again when another command changed it meanwhile
    (``EMBED_TRIES`` times, then one error line, nothing saved). ``prepare(embedded)`` runs unlocked
    after each embedding (training a new index) with ``embed_listings``' result. Returns what ``save`` returns."""
    for _ in range(EMBED_TRIES):
        done = embed_listings(artifact_dir, table, progress)
        prepared = prepare(done) if prepare else None
        with fileio.locked(artifact_dir):
            if artifact.stamp(artifact_dir) == done.stamp:
                return save(done.vectors, done.rows, prepared)
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
    except (OSError, RuntimeError, ValueError) as e:
        raise HierError(f"{folder} is damaged ({str(e).splitlines()[0][:120]}); build it again with "
                        f"`hier index build {artifact_dir} LISTINGS`") from None


def saved_listing_ids(artifact_dir: str | Path) -> set[str]:
    """The listing_ids of the saved gallery (one column read, under the lock); HierError without one."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        ids = read_saved(folder, artifact_dir, lambda: pd.read_csv(folder / "listings.csv", encoding="utf-8",
                                                                      usecols=["listing_id"], **AS_GIVEN))
    return set(ids["listing_id"].astype(str))


def refuse_clashes(artifact_dir: str | Path, table: pd.DataFrame) -> None:
    """Listings to add whose listing_id is in the saved gallery: one line, before any embedding."""
    clash = set(table["listing_id"].astype(str)) & saved_listing_ids(artifact_dir)
    if clash:
        raise HierError(f"listing {sorted(clash)[0]!r} is already in the index ({len(clash)} clashes); "
                        "remove it first (`hier index remove`) or give it another listing_id")


def _table(listings: str | Path | pd.DataFrame) -> pd.DataFrame:
    return listings if isinstance(listings, pd.DataFrame) else read_listings(Path(listings))


def build(artifact_dir: str | Path, listings: str | Path | pd.DataFrame, kind: str = "flat",
          progress=None) -> Gallery:
    """Embed listing photos (a folder, a CSV or ``read_listings``' table) and (re)build ARTIFACT/gallery;
    the embedding and the index's training run unlocked, the save under the lock."""
    factory_string(kind, 1)                   # an unknown kind fails before any work
    table = _table(listings)

    def save(vectors, rows, gallery: Gallery) -> Gallery:
        gallery.save(artifact_dir)
        return gallery
    return _embed_and_save(Path(artifact_dir), table, progress, save,
                           prepare=lambda e: Gallery.build(e.vectors, e.rows, kind, e.whitening, e.fingerprint))


def rebuild(artifact_dir: str | Path, kind: str | None = None, progress=None) -> Gallery:
    """Embed the gallery's listings again with the artifact's weights of now (after ``hier train
    --resume``), keeping the sellers' columns and the kind unless ``kind`` is given. The listing photos
    must still exist: a missing one is refused (one line) before any embedding."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        listings = read_saved(folder, artifact_dir, lambda: pd.read_csv(folder / "listings.csv", encoding="utf-8",
                                                                           **AS_GIVEN))
        meta = fileio.read_json(folder / "gallery.json") if (folder / "gallery.json").is_file() else {}
    if "image" not in listings:
        raise HierError(f"{folder}/listings.csv has no image column (a gallery of an older hier): build it "
                        f"again from the listings, `hier index build {artifact_dir} LISTINGS`")
    refuse_listed([Path(p) for p in listings["image"]], folder / "listings.csv")
    if not len(listings):
        raise HierError(f"{folder} lists no listings (all removed); build it from listings with "
                        f"`hier index build {artifact_dir} LISTINGS`")
    table = listings.drop(columns=[c for c in listings.columns if str(c).startswith(PREFIX)])
    return build(artifact_dir, table, kind or meta.get("kind", "flat"), progress)


def add(artifact_dir: str | Path, listings: str | Path | pd.DataFrame, progress=None) -> tuple[int, Gallery]:
    """Add listings to the existing index (ids of the others stay as they are). Clashing listing_ids
    are refused before any embedding; the gallery is read, extended and saved under the lock, after the
    unlocked embedding (so two adds at once both land)."""
    table = _table(listings)
    refuse_clashes(artifact_dir, table)

    def save(vectors, rows, _) -> Gallery:
        gallery = Gallery.load(artifact_dir)
        gallery.add(vectors, rows)
        gallery.save(artifact_dir)
        return gallery
    return len(table), _embed_and_save(Path(artifact_dir), table, progress, save)


def remove(artifact_dir: str | Path, ids: list[str]) -> tuple[int, Gallery]:
    """Remove listings by listing_id."""
    with fileio.locked(artifact_dir):
        gallery = Gallery.load(artifact_dir)
        n = gallery.remove(ids)
        gallery.save(artifact_dir)
    return n, gallery


def faiss_gpus() -> int:
    """GPUs faiss-gpu sees (0 with the CPU build)."""
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def placement(kind: str, gpus: int, purpose: str) -> str:
    """Where a gallery's index lives (``cpu`` | ``gpu``) for ``purpose`` (``search`` | ``edit``): edits
    and saves on the CPU (GPU indexes have no ``remove_ids`` and FAISS writes CPU indexes), HNSW always
    on the CPU (FAISS has no GPU HNSW), searches on the GPUs when there are any. Pure: tested on CPU."""
    if purpose not in ("search", "edit"):
        raise ValueError(f"purpose is search or edit, not {purpose!r}")
    return "gpu" if purpose == "search" and gpus > 0 and kind != "hnsw" else "cpu"
