"""Exports of an artifact's trunk (ONNX, int8) and the predictor that runs the freshest one."""
from hier.export.auto import artifact_predictor, export_on_first_use
from hier.export.int8 import CALIBRATION_PHOTOS, export_int8
from hier.export.onnx import export

__all__ = ["CALIBRATION_PHOTOS", "artifact_predictor", "export", "export_int8", "export_on_first_use"]
