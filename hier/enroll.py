"""Few-shot enrollment: add a fine class from a handful of photos, with no retraining.

The heads are cosine classifiers, so a class is a unit row: enrolling imprints the mean normalised
embedding of the shots as a new fine row (and as a model or brand row when those are new too). Base
rows are never modified, so old classes only lose images that now score higher on the new class.

Imprinted prototypes of a new class sit where its photos sit, inside the cloud of similar base
classes, so those classes swallow its images. Calibration (TEEN, Wang et al. 2023) moves the
prototype toward a similarity-weighted mix of base rows; ``strength`` sets how far.
"""
from __future__ import annotations

import json
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

PROTOTYPES = "prototypes.npy"


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
        w = F.normalize(head.weight.detach(), dim=1)
        head.set_rows(torch.stack([extra[n].to(w) if n in extra else w[index[n]] for n in new_names]))
    net.set_taxonomy(new)


def _enrolled(path: Path) -> tuple[list[dict], np.ndarray | None]:
    entries = artifact.read_config(path).get("enrolled", [])
    sums = np.load(path / PROTOTYPES) if entries else None
    return entries, sums


def _save(path: Path, net: HierNet, taxonomy: Taxonomy, entries: list[dict], sums: np.ndarray | None) -> None:
    files = {PROTOTYPES: lambda p: np.save(p.open("wb"), sums.astype(np.float32))} if entries else {}
    artifact.save(path, net, taxonomy, extra={"enrolled": entries}, files=files)
    if not entries:
        (path / PROTOTYPES).unlink(missing_ok=True)


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
    calibration = calibration or Calibration()
    base = [i for i, c in enumerate(taxonomy.classes) if c not in names]
    base_rows = net.fine.weight.detach()[base]

    if name in names:                                     # more shots for an enrolled class
        k = names.index(name)
        sums[k] += z.sum(0)
        entries[k]["shots"] += len(z)
        new_taxonomy, proto = taxonomy, torch.from_numpy(sums[k])
        fine_rows, model_rows, brand_rows = {name: calibration(proto, base_rows)}, {}, {}
    elif name in taxonomy:                                # --add-shots on a base class: blend into its row
        w = F.normalize(net.fine.weight.detach()[taxonomy.class_index[name]], dim=0)
        new_taxonomy, fine_rows, model_rows, brand_rows = taxonomy, {name: F.normalize(
            w + torch.from_numpy(z.mean(0)), dim=0)}, {}, {}
    else:                                                 # a new class
        row = new_row(name, taxonomy, brand, model, years)
        proto = torch.from_numpy(z.sum(0))
        new_taxonomy = taxonomy.append(row)
        fine_rows = {name: calibration(proto, base_rows)}
        model_rows = {} if row["model"] in taxonomy.models else {row["model"]: F.normalize(proto, dim=0)}
        brand_rows = {} if row["brand"] in taxonomy.brands else {row["brand"]: F.normalize(proto, dim=0)}
        entries.append({"class": name, "shots": len(z), "new_model": bool(model_rows),
                        "new_brand": bool(brand_rows)})
        sums = z.sum(0, keepdims=True) if sums is None else np.vstack([sums, z.sum(0, keepdims=True)])
    rebuild_heads(net, taxonomy, new_taxonomy, fine_rows, model_rows, brand_rows)
    _save(path, net, new_taxonomy, entries, sums)
    return {"class": name, "shots": len(z), "classes": len(new_taxonomy)}


def unenroll(path: str | Path, name: str) -> dict:
    """Remove an enrolled class (and the model/brand rows it introduced, if nothing else uses them)."""
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


def enrolled_classes(path: str | Path) -> list[dict]:
    return json.loads((Path(path) / artifact.CONFIG).read_text()).get("enrolled", [])
