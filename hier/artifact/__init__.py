"""The artifact directory: the one thing that moves between commands, and the one owner of its file
names (``files``), its model (``store``) and its training records (``records``).

``files`` is imported at once (file names only: what the command line checks before any heavy import);
the model's functions (``load``, ``save``, ``snapshot``...) import torch, so ``store`` is imported when one
of them is first used (PEP 562), as ``hier`` itself does for ``Recognizer``.
"""
from hier.artifact import files
from hier.artifact.files import (
    CONFIG,
    ENSEMBLE,
    GALLERY,
    HEAD_PARTS,
    HEADS,
    ONNX,
    REQUIRED,
    STATISTICS,
    TAXONOMY,
    WEIGHTS,
)

_STORE = ("Version", "head_rows", "load", "read_config", "save", "snapshot", "stamp")

__all__ = ["CONFIG", "ENSEMBLE", "GALLERY", "HEAD_PARTS", "HEADS", "ONNX", "REQUIRED", "STATISTICS", "TAXONOMY",
           "WEIGHTS", "files", *_STORE]


def __getattr__(name: str):
    if name in _STORE:
        from hier.artifact import store
        return getattr(store, name)
    raise AttributeError(f"module 'hier.artifact' has no attribute {name!r}")
