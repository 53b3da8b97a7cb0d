"""The enrollment protocol over many episodes, on cached embeddings (``bench_enroll.py`` builds them).

One base model, 20 held-out classes (10 with a near sibling in training, 10 without). An episode draws,
for every held-out class, ``k`` shots at random among all its photos (the rest are its test photos) and
splits the held-out base photos in two at random: score offsets are fitted on one half, the base drop is
measured on the other. Every figure is a mean over episodes with a 95% interval (t, episodes as units).
Answers are read by ``hier.metrics.served_answer`` (top-down at the fitted temperature) unless a rule
says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as st

from hier.enrollment.offsets import budget_offset, served_offset
from hier.metrics import answer_class, fit_temperature, softmax, sum_columns
from hier.models.statistics import ClassStatistics, HeadConfig


@dataclass
class Episode:
    shots: dict          # class -> indices of its shots among its photos
    tests: dict          # class -> indices of its test photos
    cal: np.ndarray      # held-out base photos offsets and temperature are fitted on
    ev: np.ndarray       # ... and those the base figures are measured on


def draw(photos: dict, n_val: int, k: int, episodes: int, seed: int) -> list[Episode]:
    """``episodes`` independent draws of ``k`` shots per held-out class and of the base halves."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        shots, tests = {}, {}
        for c, z in photos.items():
            order = rng.permutation(len(z))
            shots[c], tests[c] = order[:k], order[k:]
        half = rng.permutation(n_val)
        out.append(Episode(shots, tests, half[: n_val // 2], half[n_val // 2:]))
    return out


def interval(values) -> tuple[float, float]:
    """Mean and half-width of its 95% t interval."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(st.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


class StatisticsHead:
    """The shipped head (``ClassStatistics``) fitted on the base training photos (``labels``: their class
    names); ``fit`` adds shots. Scores come in the order of ``classes`` (the base taxonomy's, which the
    held-out base photos' indices refer to), then the new classes."""

    def __init__(self, z_train, labels, classes: list[str], config: HeadConfig | None = None, transform=None):
        self.transform = transform or (lambda z: z)
        self.stats = ClassStatistics.fit(self.transform(z_train), labels, "bench", config)
        self.base = list(classes)

    def fit(self, new: dict):
        """(W, b) over the base classes then ``new`` (class -> its shots' embeddings)."""
        if not new and getattr(self, "_base_head", None) is not None:
            return self._base_head
        saved = self.stats.classes[:], self.stats.sums, self.stats.counts, self.stats.shot_sums, \
            self.stats.shot_counts, dict(self.stats.index)
        try:
            for c, z in new.items():
                self.stats.add_shots(c, self.transform(z))
            w, b = self.stats.linear_head(self.base + list(new))
        finally:
            (self.stats.classes, self.stats.sums, self.stats.counts, self.stats.shot_sums,
             self.stats.shot_counts, self.stats.index) = saved
        head = w.numpy().astype(np.float64), b.numpy().astype(np.float64)
        if not new:
            self._base_head = head
        return head

    def scores(self, head, z):
        w, b = head
        return self.transform(z) @ w.T + b


class Protocol:
    """Held-out photos (``photos``: class -> all its embeddings), the held-out base photos (``z_val``,
    ``y_val`` over the head's base classes) and the taxonomy that maps every class to model and brand."""

    def __init__(self, photos: dict, near: set, z_val, y_val, taxonomy, shot_photos: dict | None = None):
        self.photos, self.near, self.z_val, self.y_val, self.taxonomy = photos, near, z_val, y_val, taxonomy
        self.shot_photos = shot_photos or photos     # the shots' embeddings (e.g. averaged over more views)
        self._temperature: dict = {}
        self._subsets: dict = {}

    def _maps(self, classes):
        key = tuple(classes)
        if key not in self._subsets:
            tax = self.taxonomy.subset(list(classes))
            self._subsets[key] = tax.fine_to_model, tax.fine_to_brand
        return self._subsets[key]

    def answer(self, scores, t, maps, rule):
        if rule == "flat":
            return scores.argmax(1)
        probs = softmax(scores, t)
        if rule == "top-down":
            return answer_class(probs, *maps)
        if rule == "normalised":     # brand and model sums divided by their number of classes
            f2m, f2b = maps
            nm, nb = np.bincount(f2m), np.bincount(f2b)
            brand = (sum_columns(probs, f2b, len(nb)) / nb).argmax(1)
            m2b = np.zeros(len(nm), np.int64)
            m2b[f2m] = f2b
            model = np.where(m2b[None] == brand[:, None], sum_columns(probs, f2m, len(nm)) / nm, -1).argmax(1)
            return np.where(f2m[None] == model[:, None], probs, -1).argmax(1)
        raise ValueError(rule)

    def run(self, head, episode: Episode, classes: list, budget=None, max_raise=6.0, rule="top-down",
            budget_scale: float = 1.0, served: bool = True) -> dict:
        """Enroll ``classes`` together, offsets fitted one after another as ``hier enroll`` does (``served``:
        with its check of the served answers, ``served_offset``; False: ``budget_offset`` alone, as before)."""
        base = head.base
        new = {c: self.shot_photos[c][episode.shots[c]] for c in classes}
        w = head.fit(new)
        w0 = head.fit({})
        nb = len(base)
        cal_scores = head.scores(w, self.z_val[episode.cal])
        key = (id(head), id(episode))
        if key not in self._temperature:         # the base head's, on the episode's calibration half
            self._temperature[key] = fit_temperature(head.scores(w0, self.z_val[episode.cal]), self.y_val[episode.cal])
        t = self._temperature[key]
        offsets = np.zeros(nb + len(classes))
        if budget is not None:
            cal = torch.from_numpy(cal_scores)
            off = torch.zeros(cal.shape[1], dtype=torch.float64)
            off[nb:] = 1e4
            maps = self._maps(base + list(classes))
            for i in range(len(classes)):
                off[nb + i] = 0.0
                off[nb + i] = budget_offset(cal - off, torch.from_numpy(self.y_val[episode.cal]), nb + i,
                                            budget * budget_scale, max_raise=max_raise)
                if served:          # hier enroll's check of the served answers (``served_offset``)
                    shifted = (cal - off).numpy()
                    shifted[:, nb + i] += off[nb + i].item()
                    off[nb + i] = served_offset(shifted, self.y_val[episode.cal], nb + i, off[nb + i].item(),
                                                budget * budget_scale, t, *maps)
            offsets = off.numpy()
        maps, maps0 = self._maps(base + list(classes)), self._maps(base)
        ev, y_ev = self.z_val[episode.ev], self.y_val[episode.ev]
        before = float((self.answer(head.scores(w0, ev), t, maps0, rule) == y_ev).mean())
        after = float((self.answer(head.scores(w, ev) - offsets, t, maps, rule) == y_ev).mean())
        acc = {c: float((self.answer(head.scores(w, self.photos[c][episode.tests[c]]) - offsets, t, maps, rule)
                         == nb + i).mean()) for i, c in enumerate(classes)}
        return {"acc": acc, "before": before, "after": after, "drop": 100 * (before - after)}

    def measure(self, head, episodes: list[Episode], budget=None, alone=True, **kw) -> dict:
        """Means and 95% intervals over ``episodes``: all held-out classes at once (near sibling / other,
        base drop, harmonic mean of base-after and new accuracy) and, with ``alone``, each enrolled alone."""
        classes = list(self.photos)
        rows = {k: [] for k in ("near", "other", "new", "base", "drop", "hm", "alone near", "alone other",
                                "alone drop")}
        for ep in episodes:
            r = self.run(head, ep, classes, budget, **kw)
            near = np.mean([r["acc"][c] for c in classes if c in self.near])
            other = np.mean([r["acc"][c] for c in classes if c not in self.near])
            new = np.mean(list(r["acc"].values()))
            rows["near"].append(near)
            rows["other"].append(other)
            rows["new"].append(new)
            rows["base"].append(r["before"])
            rows["drop"].append(r["drop"])
            rows["hm"].append(2 * r["after"] * new / max(r["after"] + new, 1e-12))
            if alone:
                each = [self.run(head, ep, [c], budget, **kw) for c in classes]
                rows["alone near"].append(np.mean([e["acc"][c] for e, c in zip(each, classes) if c in self.near]))
                rows["alone other"].append(np.mean([e["acc"][c] for e, c in zip(each, classes) if c not in self.near]))
                rows["alone drop"].append(np.mean([e["drop"] for e in each]))
        return {k: interval(v) for k, v in rows.items() if v}


def fmt(cell) -> str:
    mean, half = cell
    return f"{mean:.3f} ± {half:.3f}" if abs(mean) < 2 else f"{mean:.2f} ± {half:.2f}"
