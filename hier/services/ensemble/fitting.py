"""Fitting an ensemble's weights and temperature on its members' out-of-fold scores: members grouped by
recipe (the folds of one run weigh equally), weights between groups minimising the log loss of the
geometric mean jointly with the temperature, never worse than equal weights."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hier import artifact, fileio
from hier.artifact.files import OOF, TAXONOMY
from hier.artifact.records import read_oof, read_run
from hier.artifact.store import check_artifact
from hier.errors import HierError, check_number
from hier.metrics import evaluate_probs, fit_temperature, log_softmax, softmax
from hier.taxonomy import Taxonomy


@dataclass
class Candidate:
    """A member as given, checked: its config, taxonomy, recipe and out-of-fold scores."""

    name: str
    path: Path
    config: dict
    taxonomy: Taxonomy
    run: dict | None            # train.json
    oof: dict | None            # read_oof; then (``calibrate_oof``) paths, labels, log_softmax(logits / T)

    @property
    def temperature(self) -> float:
        return float(self.config["model"].get("temperature", 1.0))

    @property
    def fold(self) -> int | None:
        return (self.run or {}).get("train", {}).get("fold")

    def recipe(self) -> str | None:
        """Everything that made the run but its fold: the folds of one run share it."""
        if self.run is None or self.fold is None:
            return None
        return json.dumps({**self.run, "train": {**self.run["train"], "fold": None}}, sort_keys=True, default=str)


def candidate(path: Path) -> Candidate:
    """A member as given, read under its lock (one artifact: an ensemble's members are given instead)."""
    check_artifact(path)
    with fileio.locked(path):
        config = artifact.read_config(path)
        taxonomy = Taxonomy.from_csv(path / TAXONOMY)
        run = read_run(path) or None
        oof = read_oof(path / OOF) if (path / OOF).is_file() else None
    return Candidate(str(path), path, config, taxonomy, run, oof)


def calibrate_oof(c: Candidate, needed: bool) -> None:
    """The member's OOF logits as its calibrated log-probabilities (its own temperature); OOF scores of
    other classes are refused when weights are to be fitted, else left out (no temperature refit)."""
    oof = c.oof
    if oof is None:
        return
    if list(oof["classes"]) != c.taxonomy.classes:
        if not needed:
            c.oof = None
            return
        raise HierError(f"{c.name}/{OOF} was written for other classes than its taxonomy.csv (classes enrolled "
                        "since?); give --weights equal or w1,w2,... to build without it")
    c.oof = {"paths": list(map(str, oof["paths"])), "labels": oof["labels"].astype(np.int64),
             "scores": log_softmax(oof["logits"].astype(np.float64) / c.temperature, axis=1)}


def check_same_taxonomy(a: Candidate, b: Candidate) -> None:
    """Refuse ``b`` unless its taxonomy is ``a``'s row for row, naming the first difference."""
    ta, tb = a.taxonomy.table, b.taxonomy.table
    if len(ta) != len(tb):
        raise HierError(f"{b.name} has {len(tb)} classes, {a.name} {len(ta)}: members need one taxonomy")
    for i, (ra, rb) in enumerate(zip(ta.to_dict("records"), tb.to_dict("records"))):
        for col in sorted(set(ra) | set(rb)):
            if ra.get(col) != rb.get(col):
                raise HierError(f"{b.name}'s taxonomy differs from {a.name}'s: row {i + 1} {col} is "
                                f"{rb.get(col)!r}, not {ra.get(col)!r}; members need one taxonomy")


def parse_weights(text: str, count: int) -> str | list[float]:
    """``fit`` | ``equal`` | ``w1,w2,...`` (one per member, non-negative, not all zero; normalised)."""
    if text in ("fit", "equal"):
        return text
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != count:
        raise HierError(f"--weights gives {len(parts)} weight(s) for {count} members")
    try:
        values = [check_number("--weights", float(p), 0) for p in parts]
    except ValueError:
        raise HierError(f"--weights {text!r}: give fit, equal or {count} numbers like 0.5,0.3,0.2") from None
    if not sum(values) > 0:
        raise HierError("--weights are all zero")
    return [v / sum(values) for v in values]


def groups_of(candidates: list[Candidate]) -> list[list[int]]:
    """Members by recipe: the folds of one run (same recipe, disjoint OOF photos) form one group; any
    other member is a group of its own."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(c.recipe() or f"member {i}", []).append(i)
    out = []
    for members in groups.values():
        photos = [set(candidates[i].oof["paths"]) if candidates[i].oof else set() for i in members]
        disjoint = sum(map(len, photos)) == len(set().union(*photos))
        out.extend([members] if disjoint else [[i] for i in members])
    return out


def group_oof(candidates: list[Candidate], group: list[int]) -> dict:
    """The group's whole-data OOF: each photo scored by its own out-of-fold member."""
    oofs = [candidates[i].oof for i in group]
    return {"paths": [p for o in oofs for p in o["paths"]], "labels": np.concatenate([o["labels"] for o in oofs]),
            "scores": np.concatenate([o["scores"] for o in oofs])}


def common_photos(oofs: list[dict], names: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels of the photos every group scored, and each group's scores on them, in one order."""
    where = [{p: j for j, p in enumerate(o["paths"])} for o in oofs]
    shared = [p for p in oofs[0]["paths"] if all(p in w for w in where[1:])]
    if not shared:
        raise HierError(f"the members' out-of-fold photos do not overlap ({names[0]} and {names[1]} scored no photo "
                        "in common: other data, or runs of an older hier that named photos as given); give "
                        "--weights equal or w1,w2,...")
    rows = [np.array([w[p] for p in shared]) for w in where]
    y = oofs[0]["labels"][rows[0]]
    for o, r, name in zip(oofs[1:], rows[1:], names[1:]):
        if (o["labels"][r] != y).any():
            raise HierError(f"{name} labels some out-of-fold photos differently from {names[0]}; members need one "
                            "labelling of the data")
    return y, [o["scores"][r] for o, r in zip(oofs, rows)]


def nll(joint: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(joint, axis=1)[np.arange(len(y)), y].mean())


def fit_weights(scores: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Simplex weights (softmax of free parameters) minimising the log loss of softmax(sum_g w_g s_g / T)
    jointly with T, from equal weights and their best T: the result is never worse than equal weights."""
    from scipy.optimize import minimize  # fitting's alone: serving an ensemble needs no scipy
    from scipy.special import softmax as np_softmax
    s = np.stack(scores)
    g = len(scores)

    def loss(x: np.ndarray) -> float:
        return nll(np.tensordot(np_softmax(x[:g]), s, 1) / np.exp(x[g]), y)
    start = np.r_[np.zeros(g), np.log(fit_temperature(s.mean(0), y))]
    x = minimize(loss, start, method="L-BFGS-B").x
    return np_softmax(x[:g]) if loss(x) <= loss(start) else np.full(g, 1 / g)


def plan(candidates: list[Candidate], weights: str | list[float]) -> dict:
    """Member weights, E's temperature, and the OOF figures (members, groups, ensemble) behind them."""
    names = [c.name for c in candidates]
    groups = groups_of(candidates)
    no_oof = [c.name for c in candidates if c.oof is None]
    tax = candidates[0].taxonomy
    figures = {c.name: _figures(softmax(c.oof["scores"]), c.oof["labels"], tax) for c in candidates if c.oof}
    n = len(candidates)
    if no_oof and weights == "fit":
        raise HierError(f"{no_oof[0]} has no oof.npz (trained with --val-frac 0, or by an older hier), so no weight "
                        "can be fitted; give --weights equal or w1,w2,...")
    if no_oof:
        w = np.full(n, 1 / n) if weights == "equal" else np.asarray(weights)
        return {"weights": w.tolist(), "temperature": 1.0, "groups": groups, "members": figures, "oof": None,
                "fitted": f"weights {weights if weights == 'equal' else 'given'}; temperature 1 (not refitted: "
                          f"{no_oof[0]} has no out-of-fold scores)"}
    oofs = [group_oof(candidates, g) for g in groups]
    y, scores = common_photos(oofs, [names[g[0]] for g in groups])
    equal_group = np.array([len(g) / n for g in groups])
    if weights == "fit":
        gw = fit_weights(scores, y) if len(groups) > 1 else np.ones(1)
        w = np.zeros(n)
        for k, g in enumerate(groups):
            w[g] = gw[k] / len(g)
    else:
        w = np.full(n, 1 / n) if weights == "equal" else np.asarray(weights, dtype=np.float64)
        gw = np.array([w[g].sum() for g in groups])

    def combined(group_weights: np.ndarray) -> np.ndarray:
        return np.tensordot(group_weights, np.stack(scores), 1)
    joint = combined(gw)
    t = fit_temperature(joint, y)
    oof = {**_figures(softmax(joint, t), y, tax), "temperature": t}
    eq = combined(equal_group)
    oof["equal_weights_log_loss"] = nll(eq / fit_temperature(eq, y), y)
    how = {"fit": "group weights fitted (L-BFGS-B on the simplex, jointly with T) to minimise the OOF log loss of "
                  "the geometric mean" if len(groups) > 1 else "one group: equal weights",
           "equal": "equal weights"}.get(weights if isinstance(weights, str) else "", "weights given")
    folds = [g for g in groups if len(g) > 1]
    return {"weights": w.tolist(), "temperature": t, "groups": groups, "members": figures, "oof": oof,
            "fitted": how + ("; the folds of a run weigh equally, their OOF scores concatenated (each photo scored "
                             "by its own out-of-fold member: the per-member calibration applied to a fold-average)"
                             if folds else "") +
                      f"; temperature refitted on the combined OOF scores of {len(y)} photos"}


def _figures(probs: np.ndarray, y: np.ndarray, tax: Taxonomy) -> dict:
    m = evaluate_probs(probs, y, tax)
    return {k: m[k] for k in ("images", "log_loss", "top1", "ece")}
