"""Compiled runtimes of an artifact's ONNX export: ``run(images) -> embeddings (V, N, D)``."""
from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from hier.errors import HierWarning


class OrtSession:
    """ONNX Runtime on an export file: ``run(images (N, 3, H, W) float32) -> embeddings (V, N, D)``."""

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort
        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.views = self.session.get_outputs()[0].shape[0]

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


class OpenVinoSession:
    """OpenVINO compiling the same export file for the CPU, ``OrtSession``'s contract. Precision is
    pinned (f32 unless asked: the CPU plugin would pick bf16 on its own where the CPU has it, which
    changes answers); the THROUGHPUT hint runs several streams, so a batch is split over the infer
    requests it asks for and their outputs joined in order.

    It compiles on its first batch, in the process that runs it: a server that loads the artifact, then
    forks its workers (gunicorn ``--preload``) compiles in each worker. A process forked after the model
    compiled cannot use it (measured: the child hangs on a batch, aborts compiling again, and may hang at
    exit), so there the same file runs on ONNX Runtime, which runs on in a child (same outputs to ~1e-6;
    said once)."""

    def __init__(self, path: str | Path, precision: str = "f32"):
        self.path, self.precision = str(path), precision
        self.views = openvino_core().read_model(self.path).outputs[0].get_partial_shape()[0].get_length()
        self.pid, self.in_child, self._compiled = None, None, None
        self.setup = threading.Lock()             # the first batch's compile, once across threads

    def compiled(self):
        """The compiled model of this process (compiled now on first use)."""
        with self.setup:
            if self._compiled is None:
                import openvino as ov
                self._compiled = openvino_core().compile_model(self.path, "CPU", {
                    "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "THROUGHPUT"})
                self.queue = ov.AsyncInferQueue(self._compiled)     # as many requests as the hint asks for
                self.lock = threading.Lock()  # one batch at a time through the queue (threads of a service)
                self.pid = os.getpid()
            return self._compiled

    def _onnx_runtime(self) -> "OrtSession":
        with self.setup:
            if self.in_child is None:
                warnings.warn(f"{self.path}: OpenVINO compiled it before this process was forked and cannot run "
                              "here; answering with ONNX Runtime on the same file (load the artifact after forking, "
                              "or start workers with 'spawn', to keep OpenVINO)", HierWarning, stacklevel=3)
                self.in_child = OrtSession(self.path)
            return self.in_child

    def run(self, images: np.ndarray) -> np.ndarray:
        if self.pid is not None and os.getpid() != self.pid:
            return self._onnx_runtime().run(images)
        self.compiled()
        chunks = np.array_split(images, min(len(self.queue), len(images)))
        out: list = [None] * len(chunks)

        def done(request, i):
            out[i] = request.get_output_tensor(0).data.copy()
        with self.lock:
            self.queue.set_callback(done)
            for i, chunk in enumerate(chunks):
                self.queue.start_async({0: np.ascontiguousarray(chunk)}, i)
            self.queue.wait_all()
        return np.concatenate(out, 1)


@functools.cache
def openvino_core():
    """The process's one OpenVINO ``Core``: a second Core in a process that already compiled models
    crashes later (SIGSEGV; ultralytics met it too, ultralytics#25864), so every session shares this."""
    import openvino as ov
    return ov.Core()
