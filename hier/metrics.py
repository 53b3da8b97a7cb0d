"""Scores for a fine-class probability matrix: log loss, top-k, per-level accuracy, calibration.

``softmax`` is what every prediction runs; scipy and scikit-learn are imported by the scores that need
them, not here, so a `hier predict` process does not pay their import (about a second on 2 cores).
"""
from __future__ import annotations

import numpy as np

from hier.taxonomy import Taxonomy, sum_columns


def log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """scipy.special.log_softmax's computation: shift by the maximum (0 where it is not finite), then
    subtract the log of the sum."""
    top = np.max(x, axis=axis, keepdims=True)
    shifted = x - np.where(np.isfinite(top), top, 0)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits / temperature, axis=1))


LOG_T_BOUNDS = (-5.0, 8.0)   # T from 0.007 to 2981: the statistical head's scores run to hundreds (T ~ 28)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Scalar T minimising validation NLL of softmax(logits / T) (Guo et al. 2017), searched over log T.
    The range is wide on purpose: the earlier (-3, 3) capped T at 20.1 where a whole-trunk run's
    statistical head needed 27.7 (validation log loss 0.653 at the cap, 0.597 at the optimum)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()
    return float(np.exp(minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded").x))


ECE_BINS = 15       # equal-width confidence bins: the one binning of every ECE figure and plot


def calibration_bins(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean top-1 confidence, accuracy, photos) of each non-empty equal-width confidence bin."""
    conf, hit = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return [(float(conf[which == b].mean()), float(hit[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence over ``calibration_bins``."""
    return float(sum(abs(c - a) * n for c, a, n in calibration_bins(probs, y, bins)) / len(y))


def answer(probs: np.ndarray, taxonomy: Taxonomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """*The* answer (brand, model, fine) of each photo, read top-down from the one fine distribution:
    the likeliest brand (the sum of its classes), its likeliest model, that model's likeliest class. A
    taxonomy path by construction. Every figure (top-1, per-level accuracy, the report's tables, the
    trainer's ``val_top1``, enrollment's own-shot answers) and every returned answer (predict, the
    service, ``similar --same-brand``, listings' labels) is this one. Chosen by measurement over the
    flat argmax, reported beside it as ``flat_top1`` (docs/benchmarks/answer.md)."""
    return path_of(answer_class(probs, taxonomy.fine_to_model, taxonomy.fine_to_brand), taxonomy)


def answer_class(probs: np.ndarray, fine_to_model: np.ndarray, fine_to_brand: np.ndarray) -> np.ndarray:
    """The answer's fine class per photo, from the two integer maps alone (what a predictor holds)."""
    models, brands = int(fine_to_model.max()) + 1, int(fine_to_brand.max()) + 1
    model_to_brand = np.zeros(models, dtype=np.int64)
    model_to_brand[fine_to_model] = fine_to_brand
    brand_p = sum_columns(probs, fine_to_brand, brands)
    model_p = sum_columns(probs, fine_to_model, models)
    brand = brand_p.argmax(1)
    model = np.where(model_to_brand[None, :] == brand[:, None], model_p, -1).argmax(1)
    return np.where(fine_to_model[None, :] == model[:, None], probs, -1).argmax(1)


def served_answer(joint: np.ndarray, temperature: float, fine_to_model: np.ndarray,
                  fine_to_brand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The answer served for joint scores: the calibrated distribution ``softmax(joint / temperature)``
    and each photo's answer, its fine class read top-down (``answer_class``). The top-down answer
    depends on the temperature (a sum of probabilities, not of scores), so every answer goes through this
    one function with the served temperature: the predictor, ensembles and enrollment's own-shot check.

    Args:
        joint: (N, C) fine-class scores before the temperature.
        temperature: the artifact's fitted temperature.
        fine_to_model, fine_to_brand: the taxonomy's integer maps.

    Returns:
        (probs (N, C), fine class index (N,)).

    Example:
        >>> probs, fine = served_answer(out["joint"], net.cfg.temperature, tax.fine_to_model, tax.fine_to_brand)
    """
    probs = softmax(joint, temperature)
    return probs, answer_class(probs, fine_to_model, fine_to_brand)


def path_of(fine: np.ndarray, taxonomy: Taxonomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(brand, model, fine) of fine-class indices: the taxonomy path each belongs to."""
    return taxonomy.fine_to_brand[fine], taxonomy.fine_to_model[fine], fine


def inconsistency_rate(brand: np.ndarray, model: np.ndarray, fine: np.ndarray, taxonomy: Taxonomy) -> float:
    """Share of answers whose fine class is not under their model, or model not under their brand."""
    bad = (taxonomy.fine_to_model[fine] != model) | (taxonomy.model_to_brand[model] != brand)
    return float(bad.mean())


def top5(probs: np.ndarray, y: np.ndarray) -> float:
    """Share of photos whose class is among the five likeliest (every photo when there are five or fewer)."""
    if probs.shape[1] <= 5:
        return 1.0
    from sklearn.metrics import top_k_accuracy_score
    return float(top_k_accuracy_score(y, probs, k=5, labels=np.arange(probs.shape[1])))


def evaluate_probs(probs: np.ndarray, y: np.ndarray, taxonomy: Taxonomy,
                   logits: np.ndarray | None = None, heads: dict | None = None) -> dict:
    """All figures ``hier evaluate`` reports. ``logits`` (joint, before temperature) adds ECE before T;
    ``heads`` (raw fine/model/brand logits) adds the inconsistency of reading each head on its own (the
    answer itself is one taxonomy path by construction)."""
    from sklearn.metrics import log_loss
    labels = np.arange(len(taxonomy))
    brand, model, fine = answer(probs, taxonomy)
    out = {
        "images": int(len(y)),
        "log_loss": float(log_loss(y, probs, labels=labels)),
        "top1": float((fine == y).mean()),
        "top5": top5(probs, y),
        "model_acc": float((model == taxonomy.fine_to_model[y]).mean()),
        "brand_acc": float((brand == taxonomy.fine_to_brand[y]).mean()),
        "flat_top1": float((probs.argmax(1) == y).mean()),
        "ece": ece(probs, y),
    }
    if logits is not None:
        out["ece_before_temperature"] = ece(softmax(logits), y)
        out["log_loss_before_temperature"] = float(log_loss(y, softmax(logits), labels=labels))
    if heads is not None:
        out["independent_heads_inconsistency"] = inconsistency_rate(
            heads["brand"].argmax(1), heads["model"].argmax(1), heads["fine"].argmax(1), taxonomy)
    return out


def geometric_mean(prob_list: list[np.ndarray]) -> np.ndarray:
    """Ensemble of probability matrices as a normalised geometric mean (mean of log-probabilities)."""
    logp = np.mean([np.log(np.clip(p, 1e-12, 1)) for p in prob_list], axis=0)
    return np.exp(log_softmax(logp, axis=1))
