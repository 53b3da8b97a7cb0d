"""The gallery's transactions on an artifact: ``build``, ``rebuild``, ``add``, ``remove``, ``drop`` and
``merge`` of ``hier index``, each reading and saving ``ARTIFACT/gallery`` under the artifact's lock.

``build`` and ``add`` embed the photos *outside* the artifact's lock (a service reading the artifact
meanwhile is never stalled by a long embedding) and hold it only to check and save: the artifact's
weights, taxonomy and config must still be those the photos were embedded with (else they are embedded
again), and ``add`` reads, extends and saves the gallery under the lock, so two ``hier index add`` at
once both land.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hier import artifact, fileio
from hier.artifact.files import LISTINGS
from hier.data import refuse_listed
from hier.errors import HierError
from hier.outputs import is_inside
from hier.gallery import store
from hier.gallery.gallery import Gallery
from hier.gallery.kinds import check_size, factory_string
from hier.gallery.listings import PREFIX, read_listings
from hier.gallery.shards import BASE, shard_name
from hier.services.labelling import Embedded, embed_listings

EMBED_TRIES = 3                        # embeddings redone when the artifact changed meanwhile, then refused


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


def refuse_clashes(artifact_dir: str | Path, table: pd.DataFrame) -> None:
    """Listings to add whose listing_id is in the saved gallery (any shard): one line, before any
    embedding."""
    clash = set(table["listing_id"].astype(str)) & store.saved_listing_ids(artifact_dir)
    if clash:
        raise HierError(f"listing {sorted(clash)[0]!r} is already in the index ({len(clash)} clashes); "
                        "remove it first (`hier index remove`) or give it another listing_id")


def listings_table(listings: str | Path | pd.DataFrame, artifact_dir: str | Path | None = None) -> pd.DataFrame:
    """Listings as given: ``read_listings``' table, or a folder or CSV read by it; a folder or CSV inside
    ``artifact_dir`` is refused (`hier index build ART ART` indexed the artifact's curves.png)."""
    if isinstance(listings, pd.DataFrame):
        return listings
    if artifact_dir is not None:
        refuse_inside(listings, artifact_dir)
    return read_listings(Path(listings))


def refuse_inside(listings: str | Path, artifact_dir: str | Path) -> None:
    """HierError when the listings' folder or CSV is the artifact or inside it."""
    if is_inside(listings, artifact_dir):
        raise HierError(f"{listings} is inside the artifact {artifact_dir}: its files are no listings; give the "
                        "listings' folder or CSV")


def build(artifact_dir: str | Path, listings: str | Path | pd.DataFrame, kind: str = "flat",
          progress=None, parts: dict[str, np.ndarray] | None = None) -> Gallery:
    """Embed listing photos (a folder, a CSV or ``read_listings``' table) and (re)build ARTIFACT/gallery
    (one shard, or the rows ``parts`` names per shard); the embedding and the index's training run
    unlocked, the save under the lock."""
    factory_string(kind, 1)                   # an unknown kind fails before any work
    table = listings_table(listings, artifact_dir)
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
    folder = store.saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        shards = store.saved_rows(artifact_dir)
        meta = store.read_meta(folder, {})
    listings = pd.concat(shards.values(), ignore_index=True)
    if "image" not in listings:
        raise HierError(f"{folder}/{LISTINGS} has no image column (a gallery of an older hier): build it "
                        f"again from the listings, `hier index build {artifact_dir} LISTINGS`")
    refuse_listed([Path(p) for p in listings["image"]], folder / LISTINGS)
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
    table = listings_table(listings, artifact_dir)
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
        rows = store.saved_rows(artifact_dir, ["listing_id"])
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
