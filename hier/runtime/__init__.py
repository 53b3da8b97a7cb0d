"""Inference: the one batched forward pass (``Predictor``), the compiled sessions it can run the
trunk on (ONNX Runtime, OpenVINO) and the backend policy."""
from hier.runtime.predictor import Predictor, decode_workers, device

__all__ = ["Predictor", "decode_workers", "device"]
