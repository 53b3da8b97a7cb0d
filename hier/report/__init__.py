"""``hier report`` (one HTML page judging an artifact on labelled photos) and class-activation maps."""
from hier.report.build import report
from hier.report.cam import grad_cam, overlay, save_overlays

__all__ = ["grad_cam", "overlay", "report", "save_overlays"]
