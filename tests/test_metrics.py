import math

import pytest
import torch

from mlatlas.eval.metrics import (
    frechet_distance,
    frechet_distance_features,
    linear_probe_accuracy,
    logistic_regression,
    mmd_rbf,
    precision_recall,
)


def test_mmd_by_hand():
    """Two points each, one bandwidth: every kernel value can be written down."""
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [2.0]])

    def k(d):
        return math.exp(-d * d / 2)
    # distinct pairs within a set: k(1) for x, k(2) for y; cross: k(0), k(2), k(1), k(1)
    want = k(1) + k(2) - 2 * (k(0) + k(2) + k(1) + k(1)) / 4
    assert mmd_rbf(x, y, bandwidths=(1.0,)) == pytest.approx(want, rel=1e-12)


def test_mmd_separates_distributions():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 2, generator=gen), torch.randn(800, 2, generator=gen)
    assert abs(mmd_rbf(a, b)) < 0.01
    assert mmd_rbf(a, b + 1.0) > 20 * abs(mmd_rbf(a, b))


def test_frechet_closed_form_for_diagonal_gaussians():
    """For diagonal covariances d^2 = |mu1-mu2|^2 + sum (s1 - s2)^2 with s the std devs."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    got = frechet_distance(mu1.double(), torch.diag(s1**2).double(), mu2.double(),
                           torch.diag(s2**2).double())
    assert got == pytest.approx(float((mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()))


def test_frechet_is_rotation_invariant_and_zero_on_itself():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(500, 4, generator=gen).double() @ torch.randn(4, 4, generator=gen).double()
    b = torch.randn(500, 4, generator=gen).double()
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen).double())
    assert frechet_distance_features(a, a) == pytest.approx(0, abs=1e-9)
    assert frechet_distance_features(a @ q, b @ q) == pytest.approx(
        frechet_distance_features(a, b), rel=1e-8)


def test_precision_recall_by_construction():
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(400, 2, generator=gen)
    p, r = precision_recall(real, torch.randn(400, 2, generator=gen))
    assert p > 0.85 and r > 0.85
    # Samples collapsed onto one real point: precise, but they cover almost none of the data.
    p, r = precision_recall(real, real[:1].repeat(400, 1) + 1e-3 * torch.randn(400, 2))
    assert p == 1.0 and r < 0.05
    # Samples far away: neither.
    assert precision_recall(real, torch.randn(400, 2, generator=gen) + 50) == (0.0, 0.0)


@pytest.mark.parametrize("fn", [mmd_rbf, frechet_distance_features, precision_recall])
def test_shape_errors_are_clear(fn):
    with pytest.raises(ValueError, match="same D"):
        fn(torch.randn(10, 2), torch.randn(10, 3))


def test_score_samples_picks_the_metric_for_the_data(tmp_path):
    import numpy as np

    from mlatlas.data import load_dataset
    from mlatlas.eval.samples import score_samples

    digits = load_dataset("digits")
    scores = score_samples(digits.x_train[:100], digits)
    assert {"frechet_distance", "precision", "recall"} <= scores.keys()
    path = tmp_path / "mine.npy"
    np.save(path, np.zeros((30, 8, 8), dtype=np.uint8))
    mine = load_dataset(str(path))
    assert "no feature network ships" in score_samples(mine.x_train, mine)["note"]
    toy = load_dataset("two-moons")
    assert score_samples(toy.x_train[:100], toy)["mmd"] > 0


def test_logistic_regression_matches_sklearn_and_probe_scores_held_out_points():
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = (torch.tensor(a) for a in load_iris(return_X_y=True))
    x = (x - x.mean(0)) / x.std(0, correction=0)
    theirs = LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(x.numpy(), y.numpy())
    weight, bias = logistic_regression(x, y, c=0.5)
    # One strictly convex objective: the same minimiser, up to softmax's shift of the bias.
    assert torch.allclose(weight, torch.tensor(theirs.coef_).T, atol=1e-4)
    assert torch.allclose(bias - bias.mean(), torch.tensor(theirs.intercept_), atol=1e-4)
    # Labels need not be 0..K-1: a probe maps them back.
    accuracy = linear_probe_accuracy(x[::2], y[::2] + 10, x[1::2], y[1::2] + 10)
    assert 0.9 < accuracy <= 1.0
    assert linear_probe_accuracy(x[::2], y[::2], x[1::2], (y[1::2] + 1) % 3) < 0.1
