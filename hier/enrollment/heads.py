"""The heads' rows after a change of classes: one row per name of the new taxonomy, a new class's row
from its (mapped, calibrated) prototype."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hier.errors import check_number
from hier.models import HierNet
from hier.taxonomy import Taxonomy

Frame = Callable[[torch.Tensor, str], torch.Tensor]   # a prototype into a head's frame (``mapped.PrototypeMap``)


def rebuild_heads(net: HierNet, old: Taxonomy, new: Taxonomy, fine_rows: dict | None = None,
                  model_rows: dict | None = None, brand_rows: dict | None = None) -> None:
    """Give every head one row per name of ``new``: the old row by name, or a supplied row."""
    for head, old_names, new_names, extra in ((net.fine, old.classes, new.classes, fine_rows or {}),
                                              (net.model, old.models, new.models, model_rows or {}),
                                              (net.brand, old.brands, new.brands, brand_rows or {})):
        index = {n: i for i, n in enumerate(old_names)}
        w = head.weight.detach()        # kept as they are: forward normalises rows, so scale is moot
        head.set_rows(torch.stack([extra[n].to(w) if n in extra else w[index[n]] for n in new_names]))
    net.set_taxonomy(new)


def imprint(net: HierNet, taxonomy: Taxonomy, rows: list[dict], protos: dict[str, torch.Tensor],
            calibration: Calibration | None = None, mapping: Frame | None = None) -> Taxonomy:
    """Append new classes in memory: one fine row per class (its calibrated prototype), and a model or
    brand row (the mean of its classes' prototypes) where the model or brand is new. Returns the new
    taxonomy; the base rows are untouched."""
    calibration = calibration or Calibration()
    base_rows = net.fine.weight.detach()
    new_taxonomy = taxonomy.extend(rows)
    frame = mapping or raw_frame
    fine_rows = {r["class"]: calibration(frame(protos[r["class"]], "fine"), base_rows) for r in rows}
    groups: dict[str, dict[str, list]] = {"model": {}, "brand": {}}
    for r in rows:
        for level, known in (("model", taxonomy.models), ("brand", taxonomy.brands)):
            if r[level] not in known:
                groups[level].setdefault(r[level], []).append(F.normalize(protos[r["class"]], dim=0))
    mean = {level: {n: frame(torch.stack(v).mean(0), level) for n, v in g.items()} for level, g in groups.items()}
    rebuild_heads(net, taxonomy, new_taxonomy, fine_rows, mean["model"], mean["brand"])
    return new_taxonomy


def raw_frame(proto: torch.Tensor, level: str) -> torch.Tensor:
    """No map (artifacts without prototypes.npy): the normalised prototype itself."""
    return F.normalize(proto, dim=-1)


@dataclass
class Calibration:
    """TEEN-style: p' = normalize(p + strength * sum_b softmax(tau * cos(p, w_b)) w_b)."""

    strength: float = 0.0
    tau: float = 16.0

    def __post_init__(self) -> None:
        self.strength = check_number("--calibrate", self.strength, 0, 100)
        self.tau = check_number("calibration tau", self.tau, 1e-3, 1e3)

    def __call__(self, proto: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if not self.strength:
            return F.normalize(proto, dim=-1)
        p, w = F.normalize(proto, dim=-1), F.normalize(base, dim=-1)
        mix = torch.softmax(self.tau * p @ w.T, dim=-1) @ w
        return F.normalize(p + self.strength * mix, dim=-1)
