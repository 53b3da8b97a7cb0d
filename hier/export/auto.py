"""The artifact's predictor on the backend ``choose_backend`` picks, exporting on first use for ``auto``."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from hier import artifact
from hier.artifact.files import INT8
from hier.errors import HierError, HierWarning
from hier.export.onnx import export
from hier.models import HierNet
from hier.runtime import Predictor
from hier.runtime.backend import BACKENDS, choose_backend, export_is_fresh, has_openvino, onnx_providers
from hier.runtime.sessions import OpenVinoSession


def export_on_first_use(path: Path) -> bool:
    """Export a missing or stale ONNX file now (under the artifact's lock, as ``hier export``), so
    ``auto`` is fast without the user knowing about ONNX; an artifact that cannot be written (read-only,
    disk full) answers on eager PyTorch with one warning."""
    try:
        export(path)
        return True
    except (HierError, OSError, RuntimeError) as e:
        warnings.warn(f"{path}: could not write its ONNX export ({str(e).splitlines()[0][:120]}); answering with "
                      "eager PyTorch, slower", HierWarning, stacklevel=3)
        return False


def artifact_predictor(path: str | Path, net: HierNet, backend: str = "auto", **kw) -> Predictor:
    """The artifact's predictor, on the backend ``choose_backend`` picks: ONNX Runtime when it runs on
    the net's device, eager PyTorch otherwise, OpenVINO or int8 when asked. ``auto`` exports the weights
    first when the export is missing or stale (after ``hier train --resume``); every explicit backend
    refuses a stale export. The caller holds the artifact's lock when it compares versions
    (``artifact.stamp``) across this call."""
    path = Path(path)
    if backend not in BACKENDS:
        raise HierError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "torch":
        return Predictor(net, **kw)
    providers, where = onnx_providers(), str(next(net.parameters()).device)
    fresh = export_is_fresh(path, net)
    if backend == "auto" and choose_backend("auto", True, providers, where)[0] == "onnx":
        if not fresh:
            fresh = export_on_first_use(path)
        elif artifact.read_config(path)["onnx"].get("views", 2) != 1 and os.access(path, os.W_OK):
            with contextlib.suppress(HierError, OSError, RuntimeError):   # else it serves as it is
                export(path)     # an older hier's export of both views: one view halves --no-tta's work
    try:
        kind, providers = choose_backend(backend, fresh, providers, where, has_openvino(),
                                         backend == "onnx-int8" and export_is_fresh(path, net, "int8"))
    except HierError as e:
        raise HierError(f"{path}: {e}") from None
    if kind == "torch":                 # no usable export (or ONNX Runtime not installed): eager PyTorch
        return Predictor(net, **kw)
    if kind.startswith("openvino"):
        return Predictor(net, session=OpenVinoSession(path / artifact.ONNX, "bf16" if kind.endswith("bf16") else "f32"),
                         **kw)
    if kind == "onnx-int8":
        return Predictor(net, onnx=path / INT8, providers=providers, **kw)
    return Predictor(net, onnx=path / artifact.ONNX, providers=providers, **kw)
