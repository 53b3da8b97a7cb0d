"""A long-lived process's copy of an artifact's listing gallery: read on first use, read again when its
files change on disk, and kept while another command holds the artifact's lock (a service never stalls
behind a writer)."""
from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from hier import fileio
from hier.gallery import Gallery, gallery_files


class HeldGallery(NamedTuple):
    """The listing index in memory, its files' stamps, and each listing's photo path."""

    stamp: tuple
    gallery: Gallery
    photos: dict[str, str]


class HeldGalleries:
    """The gallery of the artifact at ``path`` as ``held()`` returns it (thread-safe)."""

    def __init__(self, path: Path):
        self.path, self._held, self._reading = Path(path), None, threading.Lock()

    def _stamp(self) -> tuple:
        """Stamps of the gallery's files, every shard's (``index.faiss`` first: None, no gallery)."""
        return fileio.file_stamp(*gallery_files(self.path))

    def held(self) -> HeldGallery:
        """The gallery of now, or the one in memory while a writer holds the artifact's lock; HierError
        when there is none (``Gallery.load`` says so)."""
        held, stamp = self._held, self._stamp()
        if held is not None and held.stamp == stamp:
            return held
        with self._reading:
            held, stamp = self._held, self._stamp()
            if held is not None and held.stamp == stamp:
                return held
            if stamp[0] is None:                      # no index (any more): Gallery.load says so
                self._held = None
                Gallery.load(self.path)
            with ExitStack() as locked:
                if not fileio.hold_lock(locked, self.path, wait=held is None):
                    return held
                stamp = self._stamp()
                gallery = Gallery.load(self.path)
            gallery.on_gpus()                         # searches only: edits load their own CPU copy
            listings = gallery.listings
            photos = dict(zip(listings["listing_id"].astype(str), listings["image"].astype(str))) \
                if "image" in listings else {}
            self._held = HeldGallery(stamp, gallery, photos)
            return self._held
