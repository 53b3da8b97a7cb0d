"""Shards: a gallery is one or more FAISS indexes of its kind, each with its listing rows (``BASE`` in the
gallery folder itself, the others in ``shards/NAME/``), named by the day their listings came or expire."""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from hier.artifact.files import SHARDS
from hier.errors import HierError
from hier.gallery.introspect import ivf_of
from hier.gallery.listings import ID
from hier.gallery.vectors import ids_digest

BASE = "base"                          # the shard every gallery has: its files in the gallery folder itself
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
