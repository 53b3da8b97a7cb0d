"""The runtime's device and backend decisions as pure functions: what a GPU host would do, checked on CPU
(the backend for the device, decoding workers). Where a gallery lives: tests/gallery/test_gallery.py."""
import pytest

from hier import HierError
from hier.runtime.backend import choose_backend


def test_the_backend_choice_fits_the_device():
    """Before: ``auto`` took CPU ONNX Runtime for a net on CUDA (and fed it a CUDA tensor's .numpy())."""
    cpu_ort, gpu_ort = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_backend("auto", True, cpu_ort, "cpu") == ("onnx", ("CPUExecutionProvider",))
    assert choose_backend("auto", True, cpu_ort, "cuda:0") == ("torch", ())          # eager CUDA, not CPU ONNX
    assert choose_backend("auto", True, gpu_ort, "cuda:0") == ("onnx", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert choose_backend("onnx", True, cpu_ort, "cuda") == ("onnx", ("CPUExecutionProvider",))   # asked for
    assert choose_backend("auto", False, gpu_ort, "cuda") == choose_backend("auto", True, [], "cpu") == ("torch", ())
    assert choose_backend("torch", True, gpu_ort, "cuda") == ("torch", ())
    for args, message in ((("onnx", False, cpu_ort, "cpu"), "hier export"), (("onnx", True, [], "cpu"), "onnxruntime"),
                          (("fast", True, cpu_ort, "cpu"), "unknown backend")):
        with pytest.raises(HierError, match=message):
            choose_backend(*args)


def test_decoding_workers_start_only_where_they_pay():
    from hier.runtime import decode_workers
    assert [decode_workers(1, 2), decode_workers(63, 2), decode_workers(64, 2)] == [0, 0, 1]
    assert [decode_workers(10_000, 1), decode_workers(10_000, None), decode_workers(10_000, 16)] == [0, 0, 4]
