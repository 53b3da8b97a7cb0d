"""Serving an ensemble: every member's own predictor computes its joint scores, combined as
``sum_i w_i * log_softmax(joint_i / T_i)`` and divided by the ensemble's temperature; answers, brand and
model sums and submissions are then those of any artifact."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hier import artifact, fileio
from hier.artifact.files import ENSEMBLE, TAXONOMY
from hier.errors import HierError
from hier.export import artifact_predictor
from hier.metrics import log_softmax, served_answer
from hier.runtime import Predictor
from hier.taxonomy import Taxonomy

CHUNK = 1024            # photos each member predicts before they are combined: bounded memory
KEYS = ("joint", "fine", "model", "brand")


@dataclass(frozen=True)
class EnsembleConfig:
    """What callers read from ``snapshot().net.cfg``: E's temperature, the largest member input size (the
    service decodes uploads down to it) and the members' TTA when they agree (None when they differ)."""

    temperature: float
    img_size: int
    tta: bool | None


@dataclass
class Member:
    name: str           # the path it was built from
    dir: Path           # its copy inside E
    net: object         # HierNet
    weight: float


@dataclass
class Ensemble:
    """What an ensemble's snapshot holds where an artifact's holds its net."""

    path: Path
    members: list[Member]
    temperature: float
    taxonomy: Taxonomy

    @property
    def cfg(self) -> EnsembleConfig:
        ttas = {m.net.cfg.tta for m in self.members}
        return EnsembleConfig(self.temperature, max(m.net.cfg.img_size for m in self.members),
                              ttas.pop() if len(ttas) == 1 else None)

    def fingerprint(self) -> str:
        """MD5 of the members' fingerprints, weights and E's temperature."""
        text = json.dumps([[m.net.fingerprint(), m.weight] for m in self.members] + [self.temperature])
        return hashlib.md5(text.encode()).hexdigest()


class _OneRow:
    """One progress row for every member's pass (each Predictor adds its own task otherwise)."""

    def __init__(self, progress, total: int):
        self.progress, self.task = progress, progress.add_task("predict (ensemble)", total=total, info="")

    def add_task(self, *args, **kwargs):
        return self.task

    def advance(self, task, n) -> None:
        self.progress.advance(task, n)


class EnsemblePredictor:
    """``Predictor``'s interface over the members' own predictors: ``joint`` = sum_i w_i log_softmax(
    joint_i / T_i) (E's scores before its temperature), ``probs`` = softmax(joint / T), ``answer`` as
    ``metrics.served_answer``; ``fine``/``model``/``brand`` are the weighted geometric means of each member
    head's distribution (for ``evaluate``'s independent-heads figure). No ``embedding``: members embed
    in spaces of their own."""

    def __init__(self, ensemble: Ensemble, predictors: list[Predictor]):
        self.ensemble, self.predictors = ensemble, predictors
        ttas = {p.tta for p in predictors}
        self.tta = ttas.pop() if len(ttas) == 1 else None
        self.weights = [m.weight for m in ensemble.members]
        self.temperatures = [m.net.cfg.temperature for m in ensemble.members]
        self.maps = (ensemble.taxonomy.fine_to_model, ensemble.taxonomy.fine_to_brand)

    def combine(self, outs: list[dict]) -> dict[str, np.ndarray]:
        """The ensemble's outputs from each member's (same photos, same class order)."""
        out = {k: sum(w * log_softmax(o[k].astype(np.float64), axis=1) for w, o in zip(self.weights, outs))
               for k in ("fine", "model", "brand")}
        out["joint"] = sum(w * log_softmax(o["joint"].astype(np.float64) / t, axis=1)
                           for w, t, o in zip(self.weights, self.temperatures, outs))
        out["probs"], out["answer"] = served_answer(out["joint"], self.ensemble.temperature, *self.maps)
        return out

    def batches(self, images: list, progress=None):
        images = list(images)
        shared = _OneRow(progress, len(images) * len(self.predictors)) if progress is not None else None
        for start in range(0, len(images), CHUNK):
            chunk = images[start:start + CHUNK]
            yield self.combine([p(chunk, shared, keep=KEYS) for p in self.predictors])

    __call__ = Predictor.__call__

    def probs_of(self, embeddings: np.ndarray) -> np.ndarray:
        raise HierError(refusal(self.ensemble.path, "answer stored embeddings", "search"))


def refusal(path: Path, what: str, verb: str) -> str:
    return f"{path} is an ensemble: it cannot {what}; {verb} with a member artifact (then build the ensemble again)"


def read(path: Path) -> dict:
    try:
        spec = fileio.read_json(path / ENSEMBLE)
        assert spec["members"] and all({"dir", "weight", "name"} <= set(m) for m in spec["members"])
        float(spec["temperature"])
    except (HierError, AssertionError, KeyError, TypeError, ValueError):
        raise HierError(f"{path} is damaged: {ENSEMBLE} does not read as an ensemble") from None
    return spec


def open_ensemble(path: Path, device: str, backend: str = "auto", batch_size: int = 64):
    """(``Ensemble``, taxonomy, ``EnsemblePredictor``) of the ensemble folder ``path`` (the caller holds its
    lock): every member read under its own lock, each checked to hold the ensemble's taxonomy."""
    spec = read(path)
    taxonomy = Taxonomy.from_csv(path / TAXONOMY)
    members = []
    for m in spec["members"]:
        folder = path / m["dir"]
        _, net, tax = artifact.snapshot(folder, device)
        if tax.table.to_dict("list") != taxonomy.table.to_dict("list"):
            raise HierError(f"{path} is damaged: the taxonomy of {folder} is not the ensemble's")
        members.append(Member(m["name"], folder, net, float(m["weight"])))
    model = Ensemble(path, members, float(spec["temperature"]), taxonomy)
    return model, taxonomy, ensemble_predictor(model, backend, batch_size=batch_size)


def ensemble_predictor(ensemble: Ensemble, backend: str = "auto", tta: bool | None = None,
                       batch_size: int = 64) -> EnsemblePredictor:
    """The ensemble's predictor: each member's own (its backend, img_size and TTA unless ``tta``)."""
    return EnsemblePredictor(ensemble, [artifact_predictor(m.dir, m.net, backend, tta=tta, batch_size=batch_size)
                                        for m in ensemble.members])
