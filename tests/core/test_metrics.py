"""The figures every command reports: top-5 and the one calibration binning."""
import numpy as np
import pytest
from sklearn.metrics import top_k_accuracy_score

from hier.metrics import ECE_BINS, calibration_bins, ece, top5


def test_top5_with_five_classes_or_fewer_is_every_photo():
    """Before: with exactly 5 classes it was top-4 (k = n - 1): a photo whose class was 5th counted wrong."""
    probs = np.array([[0.3, 0.25, 0.2, 0.15, 0.1]] * 4)
    y = np.array([0, 2, 3, 4])                                   # the last one is 5th of 5
    assert top5(probs, y) == 1.0 and top5(probs[:, :2] / probs[:, :2].sum(1, keepdims=True), y % 2) == 1.0
    rng = np.random.default_rng(0)
    many = rng.dirichlet(np.ones(12), size=200)
    labels = rng.integers(0, 12, 200)
    assert top5(many, labels) == top_k_accuracy_score(labels, many, k=5, labels=np.arange(12)) < 1


def test_ece_is_computed_over_the_bins_the_report_draws():
    """Before: the report drew 10 bins under a title giving the 15-bin ECE."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(6) * 0.3, size=500)
    y = np.where(rng.random(500) < 0.6, probs.argmax(1), rng.integers(0, 6, 500))
    bins = calibration_bins(probs, y)
    assert len(bins) <= ECE_BINS == 15 and sum(n for _, _, n in bins) == 500
    conf, hit = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, 16)
    by_hand = sum(abs(conf[m].mean() - hit[m].mean()) * m.mean()
                  for m in ((conf >= lo) & ((conf < hi) | (hi == 1)) for lo, hi in zip(edges[:-1], edges[1:])) if m.any())
    assert abs(ece(probs, y) - by_hand) < 1e-9 and ece(probs, y) > 0.01



def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    """Labels drawn from softmax(z / 2.5): the fit finds T near 2.5, inside (not at) its search bounds,
    and lowers the log loss (the old check, 0.05 < T < 20, was the search bound itself)."""
    from hier.metrics import fit_temperature, softmax
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 10)) * 6
    p = softmax(z, 2.5)
    y = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    t = fit_temperature(z, y)
    assert abs(t - 2.5) < 0.15
    nll = lambda T: -np.log(softmax(z, T)[np.arange(len(y)), y]).mean()  # noqa: E731
    assert nll(t) < nll(1.0) and nll(t) <= min(nll(t * 1.05), nll(t / 1.05))


@pytest.mark.parametrize("scale", [0.01, 1.0, 40.0])
def test_the_temperature_follows_the_scale_of_the_scores(scale):
    """The statistical head's scores run to hundreds (a whole-trunk run needed T 27.7, past the old cap
    of 20.1): the fitted T scales with the scores, so the calibrated distribution does not change."""
    from hier.metrics import fit_temperature, softmax
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2000, 10)) * 6
    y = (softmax(z, 2.5).cumsum(1) > rng.random((len(z), 1))).argmax(1)
    assert fit_temperature(z * scale, y) == pytest.approx(2.5 * scale, rel=0.08)
