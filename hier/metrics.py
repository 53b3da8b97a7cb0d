"""Scores for a fine-class probability matrix: log loss, top-k, per-level accuracy, calibration."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import log_loss, top_k_accuracy_score

from hier.taxonomy import Taxonomy


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits / temperature, axis=1))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Scalar T minimising validation NLL of softmax(logits / T) (Guo et al. 2017)."""
    def nll(log_t: float) -> float:
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()
    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


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


def decode(probs: np.ndarray, taxonomy: Taxonomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-down answer (brand, model, fine) from the one fine distribution: the likeliest brand, its
    likeliest model, that model's likeliest class. A valid taxonomy path by construction."""
    model_p, brand_p = taxonomy.marginals(probs)
    brand = brand_p.argmax(1)
    model = np.where(taxonomy.model_to_brand[None, :] == brand[:, None], model_p, -1).argmax(1)
    fine = np.where(taxonomy.fine_to_model[None, :] == model[:, None], probs, -1).argmax(1)
    return brand, model, fine


def inconsistency_rate(brand: np.ndarray, model: np.ndarray, fine: np.ndarray, taxonomy: Taxonomy) -> float:
    """Share of answers whose fine class is not under their model, or model not under their brand."""
    bad = (taxonomy.fine_to_model[fine] != model) | (taxonomy.model_to_brand[model] != brand)
    return float(bad.mean())


def top5(probs: np.ndarray, y: np.ndarray) -> float:
    """Share of photos whose class is among the five likeliest (every photo when there are five or fewer)."""
    if probs.shape[1] <= 5:
        return 1.0
    return float(top_k_accuracy_score(y, probs, k=5, labels=np.arange(probs.shape[1])))


def evaluate_probs(probs: np.ndarray, y: np.ndarray, taxonomy: Taxonomy,
                   logits: np.ndarray | None = None, heads: dict | None = None) -> dict:
    """All figures ``hier evaluate`` reports. ``logits`` (joint, before temperature) adds ECE before T;
    ``heads`` (raw fine/model/brand logits) adds the inconsistency of reading each head on its own."""
    labels = np.arange(len(taxonomy))
    brand, model, fine = decode(probs, taxonomy)
    out = {
        "images": int(len(y)),
        "log_loss": float(log_loss(y, probs, labels=labels)),
        "top1": float((probs.argmax(1) == y).mean()),
        "top5": top5(probs, y),
        "model_acc": float((model == taxonomy.fine_to_model[y]).mean()),
        "brand_acc": float((brand == taxonomy.fine_to_brand[y]).mean()),
        "full_path_acc": float(((fine == y) & (model == taxonomy.fine_to_model[y])
                                & (brand == taxonomy.fine_to_brand[y])).mean()),
        "inconsistency": inconsistency_rate(brand, model, fine, taxonomy),
        "ece": ece(probs, y),
    }
    if logits is not None:
        out["ece_before_temperature"] = ece(softmax(logits), y)
        out["log_loss_before_temperature"] = float(log_loss(y, softmax(logits), labels=labels))
    if heads is not None:
        out["independent_heads_inconsistency"] = inconsistency_rate(
            heads["brand"].argmax(1), heads["model"].argmax(1), heads["fine"].argmax(1), taxonomy)
    return out
