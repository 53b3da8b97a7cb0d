"""The statistical head: class statistics, the LDA scores they give, and their file."""
import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from hier import HierError
from hier.models.statistics import ClassStatistics, HeadConfig


def _data(classes=6, per=30, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    mix = rng.normal(size=(dim, dim))                     # one shared, far from round, spread
    y = np.repeat(np.arange(classes), per)
    z = centres[y] + 0.7 * rng.normal(size=(len(y), dim)) @ mix
    return z / np.linalg.norm(z, axis=1, keepdims=True), y


def test_scores_are_linear_discriminant_analysis():
    """Same answers as scikit-learn's LDA with the same shrinkage toward the mean variance and equal
    priors, on data whose classes share a spread that is far from round (where the nearest class mean
    goes wrong more often)."""
    z, y = _data()
    names = [f"C{i}" for i in y]
    stats = ClassStatistics.fit(z, names, "f", HeadConfig(shrink=0.1, teen=0.0))
    w, b = stats.linear_head(stats.classes)
    ours = (z @ w.numpy().T + b.numpy()).argmax(1)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1, priors=np.full(6, 1 / 6)).fit(z, y)
    assert (ours == reference.predict(z)).mean() == 1.0
    means = stats.means(stats.classes)
    nearest_mean = (z @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T).argmax(1)
    assert (ours == y).mean() > (nearest_mean == y).mean()          # measured: 0.68 vs 0.52


def test_shots_move_a_mean_and_leave_exactly():
    z, y = _data()
    stats = ClassStatistics.fit(z, [f"C{i}" for i in y], "f", HeadConfig(teen=0.0))
    before = stats.linear_head(stats.classes)
    stats.add_shots("C0", z[:3] + 0.5)                   # shots for a base class: its mean moves
    stats.add_shots("New", z[y == 2][:5])                # a new class
    assert stats.classes[-1] == "New" and stats.base_classes() == [f"C{i}" for i in range(6)]
    np.testing.assert_allclose(stats.means(["New"])[0], z[y == 2][:5].mean(0))
    assert not np.allclose(stats.linear_head(["C0"])[0], before[0][:1])
    stats.remove_shots("C0")
    stats.remove_shots("New")
    after = stats.linear_head(stats.classes)
    assert stats.classes == [f"C{i}" for i in range(6)]
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_teen_pulls_only_enrolled_means_toward_similar_base_ones():
    z, y = _data()
    names = [f"C{i}" for i in y]
    plain = ClassStatistics.fit(z, names, "f", HeadConfig(teen=0.0))
    pulled = ClassStatistics.fit(z, names, "f", HeadConfig(teen=0.3))
    for s in (plain, pulled):
        s.add_shots("New", z[y == 4][:2])
    np.testing.assert_array_equal(plain.means(plain.base_classes()), pulled.means(pulled.base_classes()))
    target = pulled.means(["C4"])[0]
    assert np.linalg.norm(pulled.means(["New"])[0] - target) < np.linalg.norm(plain.means(["New"])[0] - target)


def test_whitening_makes_the_shared_spread_round():
    z, y = _data()
    stats = ClassStatistics.fit(z, [f"C{i}" for i in y], "f")
    w = stats.whitening(0.1)
    np.testing.assert_allclose(w @ stats.covariance(0.1) @ w, np.eye(8), atol=1e-4)


def test_the_file_keeps_names_and_refuses_damage(tmp_path):
    z, y = _data(classes=3)
    names = np.array(["쏘렌토_4세대_2021_2023", "NA", "Audi TTS Coupe 2012"])[y]
    stats = ClassStatistics.fit(z, names, "abc", HeadConfig(shrink=0.3, teen=0.2))
    stats.add_shots("신형모델_2025", z[:2])
    stats.save(tmp_path / "s.safetensors")
    back = ClassStatistics.load(tmp_path / "s.safetensors")
    assert back.classes == stats.classes and back.fingerprint == "abc" and back.config == stats.config
    np.testing.assert_array_equal(back.linear_head(back.classes)[0], stats.linear_head(stats.classes)[0])
    with pytest.raises(HierError, match="damaged"):
        back.means(["unknown"])
    (tmp_path / "s.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(HierError, match="damaged"):
        ClassStatistics.load(tmp_path / "s.safetensors")
    stats.sums[0, 0] = np.nan
    with pytest.raises(HierError, match="finite"):
        stats.save(tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("n", [1, 5])
def test_an_enrolled_class_is_scored_as_its_true_mean_would_be(n):
    """A mean of n shots scores its own photos lower than the class's true mean would, by tr(P S)/(2n)
    in expectation (the noise in its bias term): ``debias`` gives that back, so over many shot draws an
    enrolled class's bias is the true mean's on average, where without it a one-shot class sat far below."""
    z, y = _data(classes=7, per=400)
    base, new = y < 6, y == 6
    names = np.array([f"C{i}" for i in y])
    true_mean = z[new].mean(0)
    rng = np.random.default_rng(1)
    biases = {0.0: [], 1.0: []}
    for debias in biases:
        stats = ClassStatistics.fit(z[base], names[base], "f", HeadConfig(teen=0.0, debias=debias))
        p = np.linalg.inv(stats.covariance())
        target = -0.5 * true_mean @ p @ true_mean
        for _ in range(300):
            stats.add_shots("C6", z[new][rng.choice(new.sum(), n, replace=False)])
            biases[debias].append(float(stats.linear_head(stats.classes)[1][-1]) - target)
            stats.remove_shots("C6")
    deficit = float(np.trace(p @ stats.scatter / stats.dof)) / (2 * n)
    error = {d: np.std(b) / np.sqrt(len(b)) for d, b in biases.items()}     # standard errors of the means
    assert deficit > 6 * max(error.values())                                      # a deficit well measured
    assert abs(np.mean(biases[0.0]) + deficit) < 3 * error[0.0]                   # as modelled ...
    assert abs(np.mean(biases[1.0])) < 3 * error[1.0]                             # ... and given back
    # base classes are scored as before, and statistics saved before debias keep scoring without it
    plain = ClassStatistics.fit(z[base], names[base], "f", HeadConfig(teen=0.0, debias=0.0))
    assert np.allclose(stats.linear_head(stats.base_classes())[1], plain.linear_head(plain.base_classes())[1])
    assert HeadConfig.from_dict({"shrink": 0.1, "teen": 0.1, "tau": 16.0}).debias == 0.0
    assert HeadConfig().debias == 1.0
