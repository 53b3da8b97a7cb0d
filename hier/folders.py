"""The kinds of folder a ``Recognizer`` holds (an artifact, an ensemble), looked up in one table (as
ultralytics' ``Model.task_map``): how each is recognised and opened, which predictor answers for it,
and what it can do.

A capability a kind lacks is refused by one rule (``FolderKind.refusal``) for every public method that
needs it (``hier.folders.needs``): no subclass, no hand-kept list of refused methods to forget a new
method in.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hier import artifact
from hier.artifact.files import is_ensemble
from hier.export import artifact_predictor
from hier.services.ensemble import open_ensemble, refusal
from hier.services.ensemble.serving import ensemble_predictor

# capability -> (what a refusal says the folder cannot do, the verb to do it with a member instead)
ANSWER, EMBED, EDIT, SEARCH, EXPLAIN, EXPORT = "answer", "embed", "edit", "search", "explain", "export"
CAPABILITIES = {
    ANSWER: ("answer photos", "predict"),
    EMBED: ("embed photos (its members embed in spaces of their own)", "embed"),
    EDIT: ("change its classes (enroll, unenroll)", "change classes"),
    SEARCH: ("hold or search a listing index", "index and search listings"),
    EXPLAIN: ("draw activation maps", "explain"),
    EXPORT: ("be exported (each member has its own export)", "export"),
}


@dataclass(frozen=True)
class FolderKind:
    """One kind of folder: how it opens, its predictor and capabilities (the files that make it one:
    ``hier.artifact.files.missing``, which the command line checks before any heavy import).

    ``opener(path, device, backend, batch_size) -> (net, taxonomy, predictor)`` (the caller holds the lock);
    ``predictor(path, net, backend, tta, batch_size)`` makes another predictor of an opened net (a TTA
    override); ``wording(path, what, verb)`` words a refusal."""

    name: str
    opener: Callable[[Path, str, str, int], tuple]
    predictor: Callable
    capabilities: frozenset[str]
    wording: Callable[[Path, str, str], str] | None = None

    def refusal(self, path: Path, capability: str) -> str | None:
        """The one-line refusal of ``capability`` for the folder ``path`` (None: the kind has it)."""
        if capability in self.capabilities:
            return None
        return self.wording(path, *CAPABILITIES[capability])


def _open_artifact(path: Path, device: str, backend: str, batch_size: int) -> tuple:
    _, net, taxonomy = artifact.snapshot(path, device)
    return net, taxonomy, artifact_predictor(path, net, backend, batch_size=batch_size)


def _artifact_predictor(path: Path, net, backend: str, tta: bool | None, batch_size: int):
    return artifact_predictor(path, net, backend, tta=tta, batch_size=batch_size)


def _ensemble_predictor(path: Path, net, backend: str, tta: bool | None, batch_size: int):
    return ensemble_predictor(net, backend, tta, batch_size)


FOLDER_KINDS = {
    "artifact": FolderKind("artifact", _open_artifact, _artifact_predictor, frozenset(CAPABILITIES)),
    "ensemble": FolderKind("ensemble", open_ensemble, _ensemble_predictor,
                             frozenset({ANSWER}), refusal),
}


def folder_kind(path: str | Path) -> FolderKind:
    """The kind of the folder at ``path`` (an ensemble has ``ensemble.json``; anything else is read as an
    artifact, whose missing files are then named)."""
    return FOLDER_KINDS["ensemble" if is_ensemble(path) else "artifact"]


def needs(capability: str):
    """Mark a public method of ``Recognizer`` with the capability it needs: on a folder whose kind lacks
    it, the call is refused in one line before any work (and ``check_supports`` refuses it up front)."""
    def wrap(method):
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            self.check_supports(method.__name__)
            return method(self, *args, **kwargs)
        checked.capability = capability
        return checked
    return wrap
