"""The similar-listing part of ``Recognizer``: the gallery held in memory, ``similar``, and the edits of
the gallery (``index_*``) and bulk embedding, each refused in one line where the folder's kind cannot
hold a gallery (an ensemble). A mixin, as scikit-learn's estimators compose theirs: ``Recognizer``
provides ``path``, ``backend``, ``batch_size``, ``_embed`` and ``_galleries``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hier.data import photo_items
from hier.folders import EMBED, SEARCH, needs
from hier.gallery import BRAND, ID, Gallery, label_columns
from hier.metrics import answer
from hier.services import embedding, indexing
from hier.services.held_artifact import Snapshot
from hier.services.labelling import answers_digest


class ListingSearch:
    """Similar listings and the listing gallery of an artifact (mixed into ``Recognizer``)."""

    @needs(SEARCH)
    def gallery(self) -> Gallery:
        """The listing index (``hier index build``), held in memory and read again when its files
        change on disk, as ``snapshot`` (a busy artifact keeps the one in memory)."""
        return self._galleries.held().gallery

    @needs(SEARCH)
    def listing_photo(self, listing_id: str) -> str | None:
        """The photo path of a listing of the gallery (None if it lists no such id)."""
        return self._galleries.held().photos.get(listing_id)

    @needs(SEARCH)
    def similar(self, image, k: int = 10, same_brand: bool = False) -> pd.DataFrame:
        """The k nearest listings to a photo, best first.

        Args:
            image: the query photo (a path, PIL image or array).
            k: listings returned (``Gallery.results`` checks it).
            same_brand: only listings answered as the query's brand.

        Returns:
            The sellers' columns and ``hier_class``/``hier_brand``/``hier_model``/``hier_similarity``: the
            answers of the head of now (the gallery's columns when its listings were labelled by this very
            head, ``answers_digest``, else every candidate answered again from its stored vector).

        Raises:
            HierError: no gallery, a stale gallery (other weights), a bad ``k``.
        """
        gallery = self.gallery()
        out, snap = self._embed(photo_items(image)[:1])
        tax = snap.taxonomy
        where = None
        if same_brand:
            brand = tax.brands[answer(out["probs"], tax)[0][0]]
            where = lambda rows: rows[BRAND] == brand  # noqa: E731
        current = gallery.labels_digest is not None and gallery.labels_digest == self._answers_digest(snap)

        def labels(vectors: np.ndarray) -> dict:
            """The listings' answers by the head of now (the snapshot that answered the query)."""
            return label_columns(snap.predictor.probs_of(vectors), tax)
        return gallery.results(out["embedding"], k, where, None if current else labels,
                               labels_key=snap.stamp)[0].drop(columns=[ID])

    def _answers_digest(self, snap: Snapshot) -> str:
        """``answers_digest`` of the snapshot's head, computed once per version of the artifact."""
        held = getattr(self, "_digest", None)
        if held is None or held[0] != snap.stamp:
            held = self._digest = (snap.stamp, answers_digest(snap.net, snap.taxonomy))
        return held[1]

    @needs(SEARCH)
    def index(self, listings, kind: str = "flat", progress=None) -> Gallery:
        """(Re)build the similar-listing index from a folder, a CSV or a ``read_listings`` table."""
        return indexing.build(self.path, listings, kind, progress)

    @needs(SEARCH)
    def index_from_embeddings(self, folder: str | Path, kind: str = "flat") -> Gallery:
        """(Re)build the index from ``hier embed`` shards, without running the network."""
        return embedding.build_gallery(self.path, folder, kind)

    @needs(SEARCH)
    def index_add(self, listings, progress=None, shard: str | None = None) -> tuple[int, Gallery]:
        """Listings into shard ``shard`` (default the base, ``today`` the UTC date's); only that shard
        is read and written."""
        return indexing.add(self.path, listings, progress, shard)

    @needs(SEARCH)
    def index_rebuild(self, kind: str | None = None, progress=None) -> Gallery:
        """Re-embed the gallery's listings with the weights of now (a stale gallery is refused until then)."""
        return indexing.rebuild(self.path, kind, progress)

    @needs(SEARCH)
    def index_remove(self, ids: list[str]) -> tuple[int, Gallery]:
        """Remove listings by id; returns how many were removed and the gallery after."""
        return indexing.remove(self.path, ids)

    @needs(SEARCH)
    def index_drop(self, shard: str) -> tuple[int, Gallery]:
        """Forget a whole shard of the gallery (its listings expired): no index read or written."""
        return indexing.drop(self.path, shard)

    @needs(SEARCH)
    def index_merge(self, shards: list[str], into: str) -> tuple[int, Gallery]:
        """Compact shards of the gallery into one (``into``: new or existing)."""
        return indexing.merge(self.path, shards, into)

    @needs(EMBED)
    def embed_shard(self, listings, out: str | Path, shard: tuple[int, int] = (0, 1), progress=None) -> Path:
        """Shard ``i`` of ``N`` of the listings' embeddings as Parquet (``hier embed``)."""
        table = indexing.listings_table(listings, self.path)
        return embedding.embed(self.path, table, out, shard, self.backend, self.batch_size, progress=progress)
