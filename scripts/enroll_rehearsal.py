"""Rehearsed enrollments: an experiment of ``bench_enroll.py``, measured and not shipped
(docs/benchmarks/enroll.md).

The idea tried (issue 32): at the end of training, hold base classes out one at a time as pseudo-new
classes (half with a sibling of the same model, the next-year case), enroll each from a few of its
training photos with the shipped head, and map the offset model's budget to the base accuracy these
rehearsals cost on held-out base photos (offsets fitted on one half, the drop measured on the other), so
that ``--max-base-drop B`` would give the model the budget whose rehearsals cost B points
(``Rehearsal.budget_for``). The rehearsed classes were trained on: they cost about the same at every
budget, unlike truly new ones, so the map does not transfer (figures: docs/benchmarks/enroll.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hier.enrollment.offsets import MAX_RAISE, budget_offset
from hier.metrics import served_answer
from hier.models.statistics import ClassStatistics
from hier.taxonomy import Taxonomy

BUDGETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)   # the model's budgets tried
SHOTS = (1, 5)                  # shots per rehearsed class
CLASSES = 16                    # classes rehearsed (at most a third of the base classes)
DRAWS = 2                       # shot draws per class and shot count


@dataclass
class Rehearsal:
    """The rehearsals' curve (stored in the artifact's config.json): for each budget given to the offset
    model, the mean base drop measured (points) and the rehearsed classes' accuracy. Empty: too little
    to rehearse on, the budget is used as it is."""

    classes: list = field(default_factory=list)
    curve: list = field(default_factory=list)     # [{"budget", "drop", "new"}], budgets ascending

    def to_dict(self) -> dict:
        return asdict(self)

    def budget_for(self, points: float) -> float:
        """The offset model's budget expected to cost ``points`` per class: the rehearsals' measured drop,
        made non-decreasing, interpolated from (0, 0); beyond the last rehearsal, its budget."""
        if not self.curve:
            return points
        budgets = [0.0] + [p["budget"] for p in self.curve]
        drops = np.maximum.accumulate([0.0] + [max(p["drop"], 0.0) for p in self.curve])
        if points >= drops[-1]:
            return budgets[-1] if drops[-1] > 0 else points
        i = int(np.searchsorted(drops, points, side="right"))      # drops[i-1] <= points < drops[i]
        lo, hi = drops[i - 1], drops[i]
        return float(budgets[i - 1] + (budgets[i] - budgets[i - 1]) * (points - lo) / (hi - lo))

    @classmethod
    def from_dict(cls, d: dict | None) -> "Rehearsal":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


def pick_classes(taxonomy: Taxonomy, present: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` base classes, half (where there are) with another class of the same model among ``present``."""
    model = {c: taxonomy.row(c)["model"] for c in present}
    per_model: dict[str, int] = {}
    for c in present:
        per_model[model[c]] = per_model.get(model[c], 0) + 1
    sibling = [c for c in present if per_model[model[c]] > 1]
    alone = [c for c in present if per_model[model[c]] == 1]
    take = min(len(sibling), n // 2)
    picked = list(rng.choice(sibling, take, replace=False)) if take else []
    rest = [c for c in alone + sibling if c not in picked]
    picked += list(rng.choice(rest, min(n - take, len(rest)), replace=False)) if rest else []
    return sorted(map(str, picked))


def rehearse(stats: ClassStatistics, z_train: np.ndarray, train_labels: list[str], z_val: np.ndarray,
             val_labels: list[str], taxonomy: Taxonomy, temperature: float, seed: int = 0,
             classes: int = CLASSES) -> Rehearsal:
    """Hold base classes out one at a time, enroll each from ``SHOTS`` of its training photos and fit
    the offset model's budgets to measured drops (``Rehearsal``) on held-out base photos (``z_val``):
    offsets on one half, the drop measured on the other, the new class on its own held-out photos.

    Args:
        stats: the base classes' statistics, as the artifact serves them.
        z_train, train_labels: the training photos' embeddings and class names (``stats`` came from them).
        z_val, val_labels: held-out photos' embeddings and class names.
        taxonomy: the artifact's taxonomy (models and brands of the answer rule).
        temperature: the served temperature (answers are read by ``served_answer``).

    Returns:
        A ``Rehearsal``; an empty one when there is too little to rehearse on.
    """
    rng = np.random.default_rng(seed)
    train_labels, val_labels = np.asarray(train_labels, object), np.asarray(val_labels, object)
    n_train = {c: int((train_labels == c).sum()) for c in stats.base_classes()}
    n_val = {c: int((val_labels == c).sum()) for c in stats.base_classes()}
    present = [c for c in stats.base_classes() if n_train[c] > max(SHOTS) and n_val[c] >= 2]
    picked = pick_classes(taxonomy, present, min(classes, len(stats.base_classes()) // 3), rng)
    if len(picked) < 2:
        return Rehearsal()
    z_train, z_val = np.asarray(z_train, np.float64), np.asarray(z_val, np.float64)
    drops: list[list[float]] = [[] for _ in BUDGETS]
    accs: list[list[float]] = [[] for _ in BUDGETS]
    for r in picked:
        held = _without(stats, r, z_train[train_labels == r])
        base = held.base_classes()
        index = {c: i for i, c in enumerate(base)}
        others = np.flatnonzero(val_labels != r)
        others = others[np.isin(val_labels[others], base)]
        tax = taxonomy.subset(base + [r])
        maps = tax.fine_to_model, tax.fine_to_brand
        maps0 = taxonomy.subset(base).fine_to_model, taxonomy.subset(base).fine_to_brand
        w0, b0 = (t.numpy().astype(np.float64) for t in held.linear_head(base))
        own = z_train[train_labels == r]
        for k in SHOTS:
            for _ in range(DRAWS):
                half = rng.permutation(others)
                fit_on, measure_on = half[: len(half) // 2], half[len(half) // 2:]
                y_fit = np.array([index[c] for c in val_labels[fit_on]])
                y_measure = np.array([index[c] for c in val_labels[measure_on]])
                shots = own[rng.choice(len(own), k, replace=False)]
                held.add_shots(r, shots)
                w, b = (t.numpy().astype(np.float64) for t in held.linear_head(base + [r]))
                held.remove_shots(r)
                fit_scores = torch.from_numpy(z_val[fit_on] @ w.T + b)
                measure_scores = z_val[measure_on] @ w.T + b
                own_scores = z_val[val_labels == r] @ w.T + b
                before = (served_answer(z_val[measure_on] @ w0.T + b0, temperature, *maps0)[1] == y_measure).mean()
                for i, budget in enumerate(BUDGETS):
                    off = budget_offset(fit_scores, torch.from_numpy(y_fit), len(base), budget, max_raise=MAX_RAISE)
                    shift = np.zeros(len(base) + 1)
                    shift[-1] = off
                    after = (served_answer(measure_scores - shift, temperature, *maps)[1] == y_measure).mean()
                    drops[i].append(100 * (before - after))
                    accs[i].append((served_answer(own_scores - shift, temperature, *maps)[1] == len(base)).mean())
    return Rehearsal(picked, [{"budget": b, "drop": round(float(np.mean(d)), 4), "new": round(float(np.mean(a)), 4)}
                              for b, d, a in zip(BUDGETS, drops, accs)])


def _without(stats: ClassStatistics, name: str, z: np.ndarray) -> ClassStatistics:
    """``stats`` with base class ``name`` (training photos ``z``) taken out: its mean and its share of
    the within-class scatter removed exactly."""
    i = stats.index[name]
    keep = np.arange(len(stats.classes)) != i
    residual = z - z.mean(0)
    return ClassStatistics([c for c in stats.classes if c != name], stats.sums[keep], stats.counts[keep],
                           stats.scatter - residual.T @ residual, stats.dof - (len(z) - 1), stats.fingerprint,
                           stats.shot_sums[keep], stats.shot_counts[keep], stats.config)
