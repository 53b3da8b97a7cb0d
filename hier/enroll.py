"""Few-shot enrollment: add a fine class from a handful of photos, with no retraining.

The heads are cosine classifiers, so a class is a unit row: enrolling imprints the mean normalised
embedding of the shots as a new fine row (and as a model or brand row when those are new too). Base
rows are never modified, so old classes only lose images that now score higher on the new class.

A raw mean embedding is not comparable with trained rows: trained cosine rows point along the
directions that separate classes, while a mean embedding keeps the component every photo shares, so it
scores high on all photos and swallows the base classes (measured: base accuracy 76% -> 0% after
enrolling 20 classes). ``PrototypeMap`` fixes the frame: a ridge regression from the base classes' mean
embeddings (``prototypes.npy``, saved by ``hier train``) to their trained rows, applied per head to the
new prototypes. ``Calibration`` (TEEN, Wang et al. 2023) can additionally pull a prototype toward
similar base rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hier import artifact
from hier.data import image_files
from hier.errors import HierError
from hier.infer import run
from hier.model import HierNet
from hier.taxonomy import Taxonomy, parse_class_name

PROTOTYPES = "prototypes.npy"   # base-class mean embeddings, written by `hier train`
ENROLLED = "enrolled.npy"       # per enrolled class: the sum of its shots' embeddings


def class_means(z: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean normalised embedding per class (rows of zeros for classes without images)."""
    means = np.zeros((n, z.shape[1]), dtype=np.float32)
    np.add.at(means, labels, z)
    return (means / np.maximum(np.bincount(labels, minlength=n), 1)[:, None]).astype(np.float32)


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


def raw_frame(proto: torch.Tensor, level: str) -> torch.Tensor:
    """No map (artifacts without prototypes.npy): the normalised prototype itself."""
    return F.normalize(proto, dim=-1)


@dataclass
class Calibration:
    """TEEN-style: p' = normalize(p + strength * sum_b softmax(tau * cos(p, w_b)) w_b)."""

    strength: float = 0.0
    tau: float = 16.0

    def __call__(self, proto: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if not self.strength:
            return F.normalize(proto, dim=-1)
        p, w = F.normalize(proto, dim=-1), F.normalize(base, dim=-1)
        mix = torch.softmax(self.tau * p @ w.T, dim=-1) @ w
        return F.normalize(p + self.strength * mix, dim=-1)


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


def _enrolled(path: Path) -> tuple[list[dict], np.ndarray | None]:
    entries = artifact.read_config(path).get("enrolled", [])
    sums = np.load(path / ENROLLED) if entries else None
    return entries, sums


def prototype_map(path: Path, net: HierNet, taxonomy: Taxonomy) -> PrototypeMap | None:
    """The artifact's map into weight space; None for artifacts trained before prototypes were saved."""
    return PrototypeMap(net, taxonomy, np.load(path / PROTOTYPES)) if (path / PROTOTYPES).is_file() else None


def _save(path: Path, net: HierNet, taxonomy: Taxonomy, entries: list[dict], sums: np.ndarray | None) -> None:
    files = {ENROLLED: lambda p: artifact.save_npy(p, sums)} if entries else {}
    artifact.save(path, net, taxonomy, extra={"enrolled": entries}, files=files)
    if not entries:
        (path / ENROLLED).unlink(missing_ok=True)


def new_row(name: str, taxonomy: Taxonomy, brand: str | None, model: str | None, years: str | None) -> dict:
    """Taxonomy row for a new class: flags win, then the class name, then the model's known brand."""
    try:
        row = parse_class_name(name)
    except HierError:
        row = {"class": name, "brand": "", "model": name, "generation": ""}
        if not years:
            raise HierError(f"cannot read years from {name!r}; pass --years 2025-2025") from None
    if model:
        row["model"] = model
    if years:
        try:
            a, _, b = years.partition("-")
            row["year_start"], row["year_end"] = int(a), int(b or a)
        except ValueError:
            raise HierError(f"--years must look like 2025-2026, not {years!r}") from None
    known = dict(zip(taxonomy.table["model"], taxonomy.table["brand"]))
    row["brand"] = brand or known.get(row["model"]) or row["brand"]
    if not row["brand"]:
        raise HierError(f"brand of {name!r} is unknown; pass --brand")
    if row["model"] in known and known[row["model"]] != row["brand"]:
        raise HierError(f"model {row['model']!r} already belongs to brand {known[row['model']]!r}")
    return row


def imprint(net: HierNet, taxonomy: Taxonomy, rows: list[dict], protos: dict[str, torch.Tensor],
            calibration: Calibration | None = None, mapping: PrototypeMap | None = None) -> Taxonomy:
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


def enroll(path: str | Path, name: str, images: list[str | Path], brand: str | None = None,
           model: str | None = None, years: str | None = None, add_shots: bool = False, min_shots: int = 1,
           calibration: Calibration | None = None) -> dict:
    """Add (or add shots to) class ``name``; the artifact is rewritten file by file, atomically."""
    path = Path(path)
    net, taxonomy = artifact.load(path)
    shots = image_files(images)
    if len(shots.paths) < min_shots:
        raise HierError(f"{len(shots.paths)} shot(s) given for {name!r}; --min-shots is {min_shots}")
    entries, sums = _enrolled(path)
    names = [e["class"] for e in entries]
    if name in taxonomy and name not in names and not add_shots:
        raise HierError(f"{name!r} is a base class of this artifact; pass --add-shots to add photos to it")
    z = run(net, shots.paths)["embedding"]
    mapping = prototype_map(path, net, taxonomy)
    frame = mapping or raw_frame
    if name in taxonomy:          # more shots: an enrolled prototype grows, a base row blends them in
        i = taxonomy.class_index[name]
        rows = net.fine.weight.detach()
        if name in names:
            k = names.index(name)
            sums[k] += z.sum(0)
            entries[k]["shots"] += len(z)
            others = torch.cat([rows[:i], rows[i + 1:]])
            row = (calibration or Calibration())(frame(torch.from_numpy(sums[k]), "fine"), others)
        else:
            row = F.normalize(F.normalize(rows[i], dim=0) + torch.from_numpy(z.mean(0)), dim=0)
        rebuild_heads(net, taxonomy, taxonomy, {name: row})
        new_taxonomy = taxonomy
    else:
        row = new_row(name, taxonomy, brand, model, years)
        new_taxonomy = imprint(net, taxonomy, [row], {name: torch.from_numpy(z.sum(0))}, calibration, mapping)
        entries.append({"class": name, "shots": len(z)})
        sums = z.sum(0, keepdims=True) if sums is None else np.vstack([sums, z.sum(0, keepdims=True)])
    _save(path, net, new_taxonomy, entries, sums)
    return {"class": name, "shots": len(z), "classes": len(new_taxonomy), "mapped": mapping is not None}


def unenroll(path: str | Path, name: str) -> dict:
    """Remove an enrolled class; model/brand rows that no remaining class uses go with it."""
    path = Path(path)
    net, taxonomy = artifact.load(path)
    entries, sums = _enrolled(path)
    names = [e["class"] for e in entries]
    if name not in names:
        raise HierError(f"{name!r} is not an enrolled class" + (" (it is a base class)" if name in taxonomy else ""))
    k = names.index(name)
    new_taxonomy = taxonomy.drop(name)
    rebuild_heads(net, taxonomy, new_taxonomy)
    _save(path, net, new_taxonomy, entries[:k] + entries[k + 1:], np.delete(sums, k, axis=0))
    return {"class": name, "classes": len(new_taxonomy)}
