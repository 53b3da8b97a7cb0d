"""Few-shot enrollment: a new class from a handful of photos, no retraining (``enroll``, ``unenroll``)."""
from hier.enrollment.classes import NEAR_DUPLICATE, enroll, nearest_base, own_answers, unenroll
from hier.enrollment.heads import Calibration, imprint
from hier.enrollment.offsets import MAX_BASE_DROP, MAX_RAISE, base_drop_offset, budget_offset
from hier.enrollment.state import OWN_SHOTS, Enrolled, Unenrolled

__all__ = ["Calibration", "Enrolled", "MAX_BASE_DROP", "MAX_RAISE", "NEAR_DUPLICATE", "OWN_SHOTS", "Unenrolled",
           "base_drop_offset", "budget_offset", "enroll", "imprint", "nearest_base", "own_answers", "unenroll"]
