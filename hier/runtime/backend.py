"""Which runtime answers: the backend policy, a pure function tested on CPU, and what is installed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from hier import artifact
from hier.artifact.files import EXPORTS
from hier.errors import HierError
from hier.models import HierNet

BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")


def choose_backend(requested: str, export_fresh: bool, providers: list[str], device: str,
                   openvino: bool = False, int8_fresh: bool = False) -> tuple[str, tuple]:
    """(``torch`` | ``onnx`` | ``onnx-int8`` | ``openvino`` | ``openvino-bf16``, ONNX Runtime providers
    to use) for a net on ``device``, given whether the artifact holds an up-to-date export (and int8
    export), the providers ONNX Runtime offers (empty: not installed) and whether OpenVINO is installed.
    ``auto`` takes ONNX Runtime only where it runs on the net's own device: on a GPU host with the CPU
    build of ONNX Runtime, eager CUDA is faster than ONNX on the CPU; on a CPU it takes OpenVINO (f32,
    the same answers to 1e-5) when installed, faster than ONNX Runtime on the CPUs measured
    (docs/benchmarks/speed.md); it never takes int8 or bf16 (they change answers). A pure function, tested on CPU."""
    if requested not in BACKENDS:
        raise HierError(f"unknown backend {requested!r}; choose {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch", ()
    if requested.startswith("openvino"):
        if not openvino:
            raise HierError(f"--backend {requested} needs OpenVINO (pip install 'hier[openvino]')")
        if not export_fresh:
            raise HierError("no up-to-date ONNX export (run `hier export`)")
        return requested, ()
    if requested == "onnx-int8":
        if not int8_fresh:
            raise HierError("no up-to-date int8 export (run `hier export ARTIFACT --int8`)")
        if not providers:
            raise HierError("--backend onnx-int8 needs onnxruntime (pip install onnxruntime)")
        return "onnx-int8", ("CPUExecutionProvider",)
    if requested == "onnx" and not (export_fresh and providers):
        raise HierError("no up-to-date ONNX export (run `hier export`)" if not export_fresh else
                        "--backend onnx needs onnxruntime (pip install onnxruntime or onnxruntime-gpu)")
    if not (export_fresh and providers):
        return "torch", ()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in providers:
            return "onnx", ("CUDAExecutionProvider", "CPUExecutionProvider")
        return ("onnx", ("CPUExecutionProvider",)) if requested == "onnx" else ("torch", ())
    if requested == "auto" and openvino:
        return "openvino", ()
    return "onnx", ("CPUExecutionProvider",)


def onnx_providers() -> list[str]:
    """The execution providers of the installed ONNX Runtime (empty when it is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime as ort
    return list(ort.get_available_providers())


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def export_is_fresh(path: Path, net: HierNet, kind: str = "onnx") -> bool:
    """The artifact holds an export (``onnx``, or ``int8``) of these very weights."""
    saved = artifact.read_config(path).get(kind, {})
    return (path / EXPORTS[kind]).is_file() and saved.get("fingerprint") == net.fingerprint()
