"""Classification losses for ``hier train --loss`` on hard labels or soft targets (MixUp/CutMix).

``ce`` is label-smoothed cross-entropy; ``focal`` (Lin et al. 2017, gamma 2) down-weights photos already
right; ``poly1`` (Leng et al. 2022, epsilon 1) adds the first polynomial term 1 - p_t; ``penalty`` (the
confidence penalty of Pereyra et al. 2017, beta 0.1) subtracts the prediction's entropy, so the network
is rewarded for not being over-sure: what log-loss competitions score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hier.errors import HierError

LOSSES = ("ce", "focal", "poly1", "penalty")
FOCAL_GAMMA, POLY_EPSILON, PENALTY_BETA = 2.0, 1.0, 0.1


def soft_targets(y: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """Class indices -> label-smoothed distributions (as ``F.cross_entropy``'s ``label_smoothing``); soft
    targets pass through."""
    if y.dtype.is_floating_point:
        return y
    return F.one_hot(y, classes).float() * (1 - smoothing) + smoothing / classes


def classification_loss(logits: torch.Tensor, y: torch.Tensor, kind: str = "ce", smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss of ``logits`` (B, C) against class indices (B,) or target distributions (B, C)."""
    if kind not in LOSSES:
        raise HierError(f"--loss must be one of {', '.join(LOSSES)}, not {kind!r}")
    if kind == "ce" and not y.dtype.is_floating_point:
        return F.cross_entropy(logits, y, label_smoothing=smoothing)      # the measured presets' exact loss
    t = soft_targets(y, logits.shape[1], smoothing)
    logp = F.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    if kind == "focal":
        return -(t * (1 - p).pow(FOCAL_GAMMA) * logp).sum(1).mean()
    ce = -(t * logp).sum(1)
    if kind == "poly1":
        return (ce + POLY_EPSILON * (1 - (t * p).sum(1))).mean()
    if kind == "penalty":
        return (ce + PENALTY_BETA * (p * logp).sum(1)).mean()       # CE - beta * entropy
    return ce.mean()


def coarser(t: torch.Tensor, fine_to_parent: torch.Tensor, parents: int) -> torch.Tensor:
    """Fine-class targets summed into their parent level (model or brand): a photo mixed from two models
    is half of each model too. Class indices map directly."""
    if not t.dtype.is_floating_point:
        return fine_to_parent[t]
    return torch.zeros(t.shape[0], parents, device=t.device, dtype=t.dtype).index_add_(1, fine_to_parent, t)
