"""The artifact directory: the one thing that moves between commands, and the one owner of its file
names (``files``), its model (``store``) and its training records (``records``)."""
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
from hier.artifact.store import Version, head_rows, load, read_config, save, snapshot, stamp

__all__ = ["CONFIG", "ENSEMBLE", "GALLERY", "HEAD_PARTS", "HEADS", "ONNX", "REQUIRED", "STATISTICS", "Version",
           "TAXONOMY", "WEIGHTS", "files", "head_rows", "load", "read_config", "save", "snapshot", "stamp"]
