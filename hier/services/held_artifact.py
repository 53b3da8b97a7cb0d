"""A long-lived process's copy of an artifact (or ensemble): read on first use, read again whenever it
changed on disk, and kept while another command holds its lock, so a service never stalls behind a
writer. ``HeldGalleries`` does the same for its listing gallery."""
from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, NamedTuple

from hier import fileio
from hier.artifact import stamp
from hier.taxonomy import Taxonomy


class Snapshot(NamedTuple):
    """One version of the folder in memory with its predictor, read under one lock: what one call
    answers with from start to end, so it never mixes two versions."""

    stamp: tuple
    net: object          # HierNet, or an ensemble's ``Ensemble``
    taxonomy: Taxonomy
    predictor: object    # ``Predictor``, or an ensemble's ``EnsemblePredictor``


class HeldArtifact:
    """The version of the folder at ``path`` that answers; ``opener()`` -> (net, taxonomy, predictor) reads
    it (the caller of ``opener`` holds the folder's lock). Thread-safe: one thread reads, the others use
    what it read."""

    def __init__(self, path: Path, opener: Callable[[], tuple]):
        self.path, self.opener = Path(path), opener
        self.loaded: Snapshot | None = None          # read on first use
        self._reading = threading.Lock()

    def snapshot(self, wait_for_readers: bool = True) -> Snapshot:
        """The version answers come from: read again first if the folder changed on disk, unless another
        command holds its lock (then the version in memory, read again on a later call). Only the very
        first read waits for a writer. ``wait_for_readers=False`` does not wait for another thread
        reading the new version either (a health check)."""
        loaded = self.loaded
        if loaded is not None and loaded.stamp == stamp(self.path):
            return loaded
        return self.read(block=wait_for_readers)

    @property
    def stale(self) -> bool:
        """The folder changed on disk since the version in memory was read (a writer still holds it)."""
        return self.loaded is None or self.loaded.stamp != stamp(self.path)

    def read(self, force: bool = False, block: bool = True) -> Snapshot:
        """Read the folder (``force``: even if unchanged, waiting for a writer, as commands do)."""
        loaded = self.loaded
        if not self._reading.acquire(blocking=block or force or loaded is None):
            return loaded                         # another thread is reading it
        try:
            loaded = self.loaded
            if not force and loaded is not None and loaded.stamp == stamp(self.path):
                return loaded
            with ExitStack() as held:
                if not fileio.hold_lock(held, self.path, wait=force or loaded is None):
                    return loaded                 # busy: answer with the version in memory
                net, taxonomy, predictor = self.opener()
                version = stamp(self.path)        # after an export on first use
            self.loaded = Snapshot(version, net, taxonomy, predictor)
            return self.loaded
        finally:
            self._reading.release()
