"""A new class's score offset: the largest raise (or smallest cut) that keeps the expected loss of
held-out base photos within the base-drop budget."""
from __future__ import annotations

import numpy as np
import torch

from hier.metrics import served_answer
from hier.models import HierNet

MAX_BASE_DROP = 0.8             # default budget (points of base accuracy) one enrolled class may cost
MAX_RAISE = 6.0                 # most an offset may raise a class's statistical score (a 5-shot mean scores low)


@torch.no_grad()
def base_drop_offset(net: HierNet, c: int, validation: tuple[torch.Tensor, torch.Tensor], max_base_drop: float,
                     floor: float = 0.1, max_raise: float = 0.0) -> float:
    """Score offset for enrolled class ``c`` of ``net`` (``budget_offset`` on its held-out base photos'
    scores, ``c``'s own current offset taken out, then ``served_offset``'s check of the served answers)."""
    z, y = validation
    joint = net.heads(z)["joint"]
    joint[:, c] += net.fine_offset[c]
    offset = budget_offset(joint, y, c, max_base_drop, floor, max_raise)
    return served_offset(joint.cpu().numpy(), y.cpu().numpy(), c, offset, max_base_drop, net.cfg.temperature,
                         net.fine_to_model.cpu().numpy(), net.fine_to_brand.cpu().numpy())


def budget_offset(scores: torch.Tensor, y: torch.Tensor, c: int, max_base_drop: float, floor: float = 0.1,
                  max_raise: float = 0.0) -> float:
    """The smallest offset subtracted from column ``c`` of ``scores`` (held-out base photos, true classes
    ``y``) such that the photos answered right without it are expected to lose at most ``max_base_drop``
    percent of all to ``c`` (at least ``floor`` photos, so that 0 stays finite). Down to ``-max_raise``:
    a negative offset raises a class the budget allows to score higher (a few-shot mean under the
    shared covariance scores low, far below what its photos deserve).

    Each base class's photos are modelled as leads (``c``'s score minus the best other) drawn from a
    normal with that class's mean lead and the spread pooled over classes (widened for the class's few
    photos): the largest lead among a few validation photos understates how far unseen photos of a
    near sibling reach, and cost several times its budget on them (docs/benchmarks/enroll.md).
    Each new class gets its own offset: one far from every base photo needs none, a next-year version
    of a known model needs one. Held-out photos, not training ones: those sit closer to their own class."""
    others = scores.clone()
    others[:, c] = -torch.inf
    right = others.argmax(1) == y
    lead = (scores[:, c] - others.max(1).values)[right].double()
    if not len(lead):
        return -max_raise
    _, cls, n = torch.unique(y[right], return_inverse=True, return_counts=True)
    mean = torch.zeros(len(n), dtype=lead.dtype).index_add_(0, cls, lead) / n
    spread = ((lead - mean[cls]) ** 2).sum() / max(1, len(lead) - len(n))
    sd = (spread * (1 + 1 / n)).sqrt().clamp_min(1e-6)
    allowed = max(max_base_drop / 100 * len(y), floor)

    def taken(offset: float) -> float:                        # expected photos lost to c at this offset
        return float((n * torch.special.ndtr((mean - offset) / sd)).sum())

    lo, hi = -max_raise, float((mean + 8 * sd).max().clamp_min(0))
    if taken(lo) <= allowed:
        return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if taken(mid) <= allowed else (mid, hi)
    return hi


def served_offset(scores: np.ndarray, y: np.ndarray, c: int, offset: float, max_base_drop: float,
                  temperature: float, fine_to_model: np.ndarray, fine_to_brand: np.ndarray) -> float:
    """``offset`` raised, when needed, until the held-out base photos answered right *as served* (the one
    answer rule, top-down) lose at most ``max_base_drop`` points to the class ``c``'s presence.

    ``budget_offset`` counts the photos ``c`` itself takes (its score above the best other). The served
    answer reads brand, then model, then class, from sums of probabilities: a class joining a brand can
    flip another brand's photo to one of its brand's classes while never being the answer itself (the
    enrollment benchmark page has a weak model's case). Here the drop is measured on the photos, against
    the answers with ``c`` left out; when even the largest offset does not bring it within the budget, the
    drop is not ``c``'s score's doing and ``offset`` stays.

    Args:
        scores: (N, C) joint scores of held-out base photos, ``c``'s column with no offset.
        y: (N,) their true classes.
        c: the enrolled class's column.
        offset: ``budget_offset``'s answer (subtracted from ``c``'s scores).
        max_base_drop: the budget, in points of accuracy.
        temperature, fine_to_model, fine_to_brand: the served answer's (``served_answer``).

    Returns:
        The smallest offset at least ``offset`` within the budget (to 1e-3), or ``offset``.
    """
    def right(off: float) -> float:
        shifted = scores.copy()
        shifted[:, c] -= off
        return float((served_answer(shifted, temperature, fine_to_model, fine_to_brand)[1] == y).mean())

    without = scores.copy()
    without[:, c] = -np.inf
    allowed = float((served_answer(without, temperature, fine_to_model, fine_to_brand)[1] == y).mean()) \
        - max_base_drop / 100 - 1e-9
    if right(offset) >= allowed:
        return offset
    hi = offset + float(np.ptp(scores[np.isfinite(scores)])) + 1.0      # c below every score: never in a sum's lead
    if right(hi) < allowed:
        return offset
    lo = offset
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if right(mid) >= allowed else (mid, hi)
    return hi
