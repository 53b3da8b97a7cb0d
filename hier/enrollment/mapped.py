"""Enrollment into an artifact served by its trained cosine head (trained before the class statistics,
or ``--head trained``): the shots' mean mapped into the trained rows' frame (``PrototypeMap``, a ridge
regression from base-class mean embeddings to their rows) and optionally pulled toward similar base
rows (``Calibration``, TEEN, Wang et al. 2023)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hier.artifact.files import PROTOTYPES
from hier.enrollment.heads import Calibration, imprint, raw_frame, rebuild_heads
from hier.models import HierNet
from hier.models.statistics import class_means
from hier.taxonomy import Taxonomy

BASE_PRIOR_SHOTS = 20           # photos a trained row counts for when added shots are blended into it


class PrototypeMap:
    """Per-head ridge maps from base-class mean embeddings to the trained rows of that head."""

    def __init__(self, net: HierNet, taxonomy: Taxonomy, prototypes: np.ndarray, ridge: float = 0.1):
        base = len(prototypes)                       # base classes come first in the taxonomy
        p = F.normalize(torch.from_numpy(prototypes).float(), dim=1)
        self.maps = {}
        for level, groups, head in (("fine", np.arange(base), net.fine),
                                    ("model", taxonomy.fine_to_model[:base], net.model),
                                    ("brand", taxonomy.fine_to_brand[:base], net.brand)):
            used = np.unique(groups)
            x = F.normalize(torch.from_numpy(class_means(p.numpy(), groups, groups.max() + 1)[used]), dim=1)
            w = F.normalize(head.weight.detach()[torch.from_numpy(used)], dim=1)
            self.maps[level] = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ w)

    def __call__(self, proto: torch.Tensor, level: str) -> torch.Tensor:
        return F.normalize(F.normalize(proto, dim=-1) @ self.maps[level], dim=-1)


def prototype_map(path: Path, net: HierNet, taxonomy: Taxonomy) -> PrototypeMap | None:
    """The artifact's map into weight space; None for artifacts trained before prototypes were saved."""
    return PrototypeMap(net, taxonomy, np.load(path / PROTOTYPES)) if (path / PROTOTYPES).is_file() else None


@torch.no_grad()
def blend_shots(net: HierNet, i: int, trained_row: torch.Tensor, mapped_shots: torch.Tensor, shots: int,
                prototypes: np.ndarray) -> torch.Tensor:
    """Base class ``i``'s row after ``--add-shots``: its trained row nudged toward the mapped mean of the
    new photos, weighted as ``shots`` photos against ``BASE_PRIOR_SHOTS`` for the trained row. Both
    vectors live in the trained rows' frame. The weight halves (down to 0, the trained row) until no
    other base class's mean embedding is answered as class ``i`` where it was not before: added shots
    may sharpen a class, never let it take its neighbours."""
    z = F.normalize(torch.from_numpy(prototypes).float(), dim=1)
    others = torch.arange(len(z)) != i
    weight, keep = net.fine.weight, net.fine.weight[i].clone()
    taken_before = net.heads(z)["joint"].argmax(1) == i
    w0 = shots / (shots + BASE_PRIOR_SHOTS)
    for w in [w0 / 2 ** j for j in range(6)] + [0.0]:
        row = F.normalize((1 - w) * F.normalize(trained_row, dim=0) + w * F.normalize(mapped_shots, dim=0), dim=0)
        weight[i] = row
        if not ((net.heads(z)["joint"].argmax(1) == i) & others & ~taken_before).any():
            break
    weight[i] = keep
    return row


def enroll_mapped(path: Path, net: HierNet, taxonomy: Taxonomy, name: str, row: dict | None, z: np.ndarray,
                   entries: list[dict], k: int, sums, trained, mapping: PrototypeMap | None,
                   calibration: Calibration | None):
    """Enrollment into an artifact served by its trained head (trained before the class statistics, or
    ``--head trained``): the shots' mean mapped into the trained rows' frame."""
    frame = mapping or raw_frame
    if len(entries) > (0 if sums is None else len(sums)):    # a new entry: its shot sum starts at zero
        sums = _stack(sums, np.zeros_like(z[:1]))
        if entries[k].get("base"):                          # first shots for a base class: keep its row
            i = taxonomy.class_index[name]
            trained = _stack(trained, net.fine.weight.detach()[i:i + 1].numpy())
    sums[k] += z.sum(0)
    if row is not None:
        return imprint(net, taxonomy, [row], {name: torch.from_numpy(z.sum(0))}, calibration, mapping), sums, trained
    i = taxonomy.class_index[name]
    rows = net.fine.weight.detach()
    proto = frame(torch.from_numpy(sums[k]), "fine")
    if entries[k].get("base"):
        trained_row = torch.from_numpy(trained[trained_row_index(entries, k)])
        new_fine = blend_shots(net, i, trained_row, proto, entries[k]["shots"] + len(z), np.load(path / PROTOTYPES))
    else:
        new_fine = (calibration or Calibration())(proto, torch.cat([rows[:i], rows[i + 1:]]))
    rebuild_heads(net, taxonomy, taxonomy, {name: new_fine})
    return taxonomy, sums, trained


def trained_row_index(entries: list[dict], k: int) -> int:
    """Row of ``trained_rows.npy`` that belongs to entry ``k`` (a base class with added shots)."""
    return sum(bool(e.get("base")) for e in entries[:k])


def _stack(rows: np.ndarray | None, more: np.ndarray) -> np.ndarray:
    return more.astype(np.float32) if rows is None else np.vstack([rows, more]).astype(np.float32)
