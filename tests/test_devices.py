"""Device and backend decisions as pure functions: what a GPU host would do, checked on CPU."""
import pytest

from hier import HierError
from hier.engine.predictor import choose_backend


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
