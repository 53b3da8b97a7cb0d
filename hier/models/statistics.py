"""The head that serves every class: class statistics in the embedding, in closed form.

The trained cosine heads are how the embedding is *learned*. The fine-class scores that *serve* come
from statistics of the embedding, the same formula for base and enrolled classes, so a class enrolled
from five photos is scored in the same geometry as one trained on forty (linear discriminant analysis):

    score_c(z) = z . P mu_c - 1/2 mu_c . P mu_c,    P = inverse of one shared, shrunk within-class covariance

with ``mu_c`` the class's mean embedding (training photos for a base class, plus any added shots; an
enrolled class's few-shot mean is pulled toward the means of the base classes it resembles: TEEN,
Wang et al. 2023). A mean of n shots carries noise of covariance S/n, which lowers its bias term by
tr(P S)/(2n) in expectation: an enrolled class's bias is raised by that much (``debias``), so that a
one-shot class is scored as its true mean would be, not buried under it. The covariance comes from the base classes' training photos only, so the held-out
photos stay honest for the temperature, the offsets and every reported figure. Brand and model stay
sums of the fine probabilities (the hierarchy is exact); enrollment adds a mean, with no gradient step.

``ClassStatistics`` is keyed by class name, never by position, and records the fingerprint of the
trunk and embedding weights it was computed with: statistics of other weights are never used.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hier.errors import HierError, check_number


@dataclass
class HeadConfig:
    """How the statistics become scores (the measured defaults: docs/benchmarks/enroll.md)."""

    shrink: float = 0.1      # covariance shrinkage toward its mean variance (0: none, 1: nearest mean)
    teen: float = 0.1        # share of an enrolled class's mean taken from similar base means
    tau: float = 16.0        # sharpness of that similarity (softmax over cosines)
    debias: float = 1.0      # share of an n-shot mean's expected score deficit, tr(P S)/(2n), given back

    def __post_init__(self) -> None:
        self.shrink = check_number("shrink", self.shrink, 0, 1)
        self.teen = check_number("teen", self.teen, 0, 1)
        self.debias = check_number("debias", self.debias, 0, 10)
        self.tau = check_number("tau", self.tau, 1e-3, 1e3)

    @classmethod
    def from_dict(cls, d: dict | None) -> "HeadConfig":
        """As stored; statistics saved before ``debias`` existed keep scoring without it (their enrolled
        classes' offsets were fitted to those scores)."""
        return cls(**{"debias": 0.0, **{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}})


class ClassStatistics:
    """Per-class sums and counts of embeddings and the base photos' within-class scatter.

    ``sums``/``counts``: the training photos of base classes (zero for enrolled ones); ``shot_sums``/
    ``shot_counts``: photos enrolled with ``hier enroll`` (a new class's shots, or shots added to a base
    class), kept apart so that ``unenroll`` restores a base class exactly.
    """

    def __init__(self, classes: list[str], sums: np.ndarray, counts: np.ndarray, scatter: np.ndarray,
                 dof: int, fingerprint: str, shot_sums: np.ndarray | None = None,
                 shot_counts: np.ndarray | None = None, config: HeadConfig | None = None):
        self.classes = list(classes)
        self.sums, self.counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        self.shot_sums = np.zeros_like(self.sums) if shot_sums is None else np.asarray(shot_sums, np.float64)
        self.shot_counts = np.zeros_like(self.counts) if shot_counts is None else np.asarray(shot_counts, np.float64)
        self.scatter, self.dof, self.fingerprint = np.asarray(scatter, np.float64), int(dof), fingerprint
        self.config = config or HeadConfig()
        self.index = {c: i for i, c in enumerate(self.classes)}

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, z: np.ndarray, labels: list[str] | np.ndarray, fingerprint: str,
            config: HeadConfig | None = None) -> "ClassStatistics":
        """From embeddings of the base classes' training photos and their class names."""
        names, y = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
        z = np.asarray(z, np.float64)
        sums = np.zeros((len(names), z.shape[1]))
        np.add.at(sums, y, z)
        counts = np.bincount(y, minlength=len(names)).astype(np.float64)
        residual = z - (sums / counts[:, None])[y]
        return cls(list(names), sums, counts, residual.T @ residual, len(z) - len(names), fingerprint,
                   config=config)

    def add_shots(self, name: str, z: np.ndarray) -> None:
        """Photos of class ``name`` (new, or one it has): its mean moves, the shared covariance does not."""
        if name not in self.index:
            self.index[name] = len(self.classes)
            self.classes.append(name)
            dim = self.sums.shape[1]
            self.sums, self.counts = np.vstack([self.sums, np.zeros((1, dim))]), np.append(self.counts, 0.0)
            self.shot_sums = np.vstack([self.shot_sums, np.zeros((1, dim))])
            self.shot_counts = np.append(self.shot_counts, 0.0)
        i = self.index[name]
        self.shot_sums[i] += np.asarray(z, np.float64).sum(0)
        self.shot_counts[i] += len(z)

    def remove_shots(self, name: str) -> None:
        """Forget the enrolled photos of ``name``: a class with no training photos goes altogether."""
        i = self.index[name]
        if self.counts[i]:
            self.shot_sums[i], self.shot_counts[i] = 0.0, 0.0
            return
        keep = np.arange(len(self.classes)) != i
        self.classes.pop(i)
        self.sums, self.counts = self.sums[keep], self.counts[keep]
        self.shot_sums, self.shot_counts = self.shot_sums[keep], self.shot_counts[keep]
        self.index = {c: j for j, c in enumerate(self.classes)}

    def base_classes(self) -> list[str]:
        """Classes with training photos (as opposed to enrolled ones)."""
        return [c for c, n in zip(self.classes, self.counts) if n > 0]

    # --- scoring --------------------------------------------------------------------------------------
    def covariance(self, shrink: float | None = None) -> np.ndarray:
        """The shared within-class covariance, shrunk toward its mean variance (Ledoit-Wolf's target)."""
        shrink = self.config.shrink if shrink is None else shrink
        s = self.scatter / max(self.dof, 1)
        d = len(s)
        return (1 - shrink) * s + shrink * np.trace(s) / d * np.eye(d)

    def means(self, classes: list[str]) -> np.ndarray:
        """Mean embedding of each of ``classes`` (in that order); enrolled classes' means calibrated."""
        missing = [c for c in classes if c not in self.index]
        if missing:
            raise HierError(f"the class statistics have no {missing[0]!r} ({len(missing)} class(es) missing): "
                            "the artifact is damaged; retrain, or unenroll and enroll that class again")
        idx = np.array([self.index[c] for c in classes], dtype=np.int64)
        n = self.counts + self.shot_counts
        mu = (self.sums + self.shot_sums) / np.maximum(n, 1)[:, None]
        out = mu[idx]
        base = self.counts > 0
        few = ~base[idx]
        if self.config.teen and few.any() and base.any():
            b = mu[base] / np.linalg.norm(mu[base], axis=1, keepdims=True)
            m = out[few] / np.maximum(np.linalg.norm(out[few], axis=1, keepdims=True), 1e-12)
            w = self.config.tau * (m @ b.T)
            w = np.exp(w - w.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            out[few] = (1 - self.config.teen) * out[few] + self.config.teen * (w @ mu[base])
        return out

    def linear_head(self, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with score = z @ W.T + b for each of ``classes``: LDA with equal priors, an enrolled
        class's bias raised by ``debias`` times its n-shot mean's expected deficit, tr(P S)/(2n)."""
        mu = self.means(classes)
        cov = self.covariance()
        pm = np.linalg.solve(cov, mu.T).T          # P mu_c (P symmetric)
        bias = -0.5 * np.einsum("cd,cd->c", mu, pm)
        idx = np.array([self.index[c] for c in classes], dtype=np.int64)
        few = (self.counts[idx] == 0) & (self.shot_counts[idx] > 0)
        if self.config.debias and few.any():
            noise = float(np.trace(np.linalg.solve(cov, self.scatter / max(self.dof, 1))))     # tr(P S)
            bias[few] += self.config.debias * noise / (2 * self.shot_counts[idx][few])
        return torch.from_numpy(pm.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))

    def whitening(self, shrink: float) -> np.ndarray:
        """S^-1/2 of the covariance: the map that makes within-class spread round (for search)."""
        vals, vecs = np.linalg.eigh(self.covariance(shrink))
        return ((vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T).astype(np.float32)

    # --- files ----------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """One safetensors file: the arrays, and the class names (row order) in its metadata."""
        from safetensors.numpy import save
        meta = {"classes": json.dumps(self.classes, ensure_ascii=False), "dof": str(self.dof),
                "fingerprint": self.fingerprint, "config": json.dumps(asdict(self.config))}
        arrays = {"sums": self.sums, "counts": self.counts, "shot_sums": self.shot_sums,
                  "shot_counts": self.shot_counts, "scatter": self.scatter}
        if not all(np.isfinite(a).all() for a in arrays.values()):
            raise HierError(f"refusing to save {path.name}: a class statistic is not a finite number")
        Path(path).write_bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> "ClassStatistics":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "numpy") as f:
                meta = f.metadata()
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            return cls(json.loads(meta["classes"]), arrays["sums"], arrays["counts"], arrays["scatter"],
                       int(meta["dof"]), meta["fingerprint"], arrays["shot_sums"], arrays["shot_counts"],
                       HeadConfig.from_dict(json.loads(meta.get("config", "{}"))))
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise HierError(f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}); retrain to rebuild it") from None


def class_means(z: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean normalised embedding per class (rows of zeros for classes without images)."""
    means = np.zeros((n, z.shape[1]), dtype=np.float32)
    np.add.at(means, labels, z)
    return (means / np.maximum(np.bincount(labels, minlength=n), 1)[:, None]).astype(np.float32)
