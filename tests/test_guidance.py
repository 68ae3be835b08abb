"""Guidance against its closed forms (theory) and a short classifier training (behaviour).

Classifier-free guidance must reduce to the conditional and unconditional models at w = 0 and
w = -1; classifier guidance must add s sigma^2 grad log p(y | x; sigma) to the denoiser, which on
a Gaussian mixture with the exact classifier and the exact D is the exact conditional denoiser.
"""

import math

import pytest
import torch

from mlatlas.core.io import CheckpointError, save_tensors
from mlatlas.data import load_dataset
from mlatlas.generative.diffusion.guidance import (
    NoisyClassifier,
    class_spread,
    classifier_free,
    classifier_guided,
    diversity,
    load_noisy_classifier,
    noisy_classifier_loss,
    save_noisy_classifier,
    train_noisy_classifier,
)
from mlatlas.nn.unet import TimeMLP


def conditional_net():
    return TimeMLP(2, hidden=32, num_classes=3).double()


# --- classifier-free guidance ------------------------------------------------------------------

def test_classifier_free_reduces_to_the_conditional_and_unconditional_models():
    model, x, t = conditional_net(), torch.randn(6, 2, dtype=torch.float64), torch.rand(6) * 100
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    conditional, unconditional = model(x, t, labels), model(x, t)
    assert torch.equal(classifier_free(model, labels, 0.0)(x, t), conditional)
    assert torch.allclose(classifier_free(model, labels, -1.0)(x, t), unconditional, atol=1e-12)
    assert classifier_free(model, None, 3.0) is model


@pytest.mark.parametrize("w", [0.5, 2.0, 7.5])
def test_classifier_free_batched_equals_two_separate_calls(w):
    model, x, t = conditional_net(), torch.randn(5, 2, dtype=torch.float64), torch.rand(5) * 100
    labels = torch.tensor([2, 0, 1, 1, 0])
    expected = (1 + w) * model(x, t, labels) - w * model(x, t)
    assert torch.allclose(classifier_free(model, labels, w)(x, t), expected, atol=1e-12)


# --- classifier guidance: the shift s sigma^2 grad log p -----------------------------------------

def shrink(x, sigma):
    """A stand-in denoiser: the optimal one for N(0, I) data."""
    return x / (1 + sigma**2)


def test_scale_zero_is_the_denoiser_itself():
    clf = NoisyClassifier((2,), 3)
    assert classifier_guided(shrink, clf, torch.tensor([0, 1]), 0.0) is shrink


def finite_difference_grad_log_p(clf, x, sigma, labels, h=1e-6):
    """Central differences of log p(y | x; sigma) in every coordinate, all in one batch."""
    b, d = len(x), x[0].numel()
    steps = h * torch.eye(d, dtype=x.dtype).reshape(d, *x.shape[1:])
    plus = (x[:, None] + steps[None]).reshape(b * d, *x.shape[1:])
    minus = (x[:, None] - steps[None]).reshape(b * d, *x.shape[1:])
    sig = torch.full((b * d,), sigma, dtype=x.dtype)
    y = labels.repeat_interleave(d)[:, None]
    with torch.no_grad():
        lp_plus = clf(plus, sig).log_softmax(1).gather(1, y)
        lp_minus = clf(minus, sig).log_softmax(1).gather(1, y)
    return ((lp_plus - lp_minus) / (2 * h)).reshape(x.shape)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
@pytest.mark.parametrize("sigma", [0.05, 1.3, 20.0])
def test_guided_shift_is_s_sigma2_grad_log_p(shape, sigma):
    torch.manual_seed(1)
    clf = NoisyClassifier(shape, 4, width=8).double()
    x = torch.randn(3, *shape, dtype=torch.float64) * (1 + sigma)
    labels, s = torch.tensor([3, 0, 2]), 2.5
    with torch.no_grad():  # as inside a sampler
        shift = classifier_guided(shrink, clf, labels, s)(x, sigma) - shrink(x, sigma)
    grad = finite_difference_grad_log_p(clf, x, sigma, labels)
    assert grad.abs().max() > 1e-5  # the check has something to compare
    assert (shift - s * sigma**2 * grad).abs().max() <= 1e-6 * s * sigma**2 * grad.abs().max()


# --- the theory check: exact classifier + exact D = exact conditional denoiser ------------------

class GaussianMixture(torch.nn.Module):
    """p(x_0) = sum_y pi_y N(mu_y, s_y^2 I). At noise level sigma, x | y ~ N(mu_y, (s_y^2 +
    sigma^2) I), so p(y | x; sigma) and E[x_0 | x, y] are closed forms."""

    def __init__(self, pi, mu, s):
        super().__init__()
        self.log_pi = torch.tensor(pi, dtype=torch.float64).log()
        self.mu = torch.tensor(mu, dtype=torch.float64)  # (K, D)
        self.s2 = torch.tensor(s, dtype=torch.float64) ** 2  # (K,)
        self.num_classes = len(pi)

    def forward(self, x, sigma):  # logits log pi_y + log N(x; mu_y, v_y I), up to a constant
        v = self.s2[None] + sigma[:, None] ** 2  # (B, K)
        d = x.shape[1]
        sq = (x[:, None] - self.mu[None]).pow(2).sum(-1)
        return self.log_pi[None] - 0.5 * sq / v - 0.5 * d * v.log()

    def conditional_denoiser(self, x, sigma, y):
        s2 = self.s2[y][:, None]
        return self.mu[y] + s2 / (s2 + sigma**2) * (x - self.mu[y])

    def denoiser(self, x, sigma):
        posterior = self(x, torch.full((len(x),), sigma, dtype=x.dtype)).softmax(1)  # (B, K)
        per_class = torch.stack([self.conditional_denoiser(x, sigma, torch.full(
            (len(x),), k)) for k in range(self.num_classes)], 1)  # (B, K, D)
        return (posterior[..., None] * per_class).sum(1)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 5.0, 50.0])
def test_exact_classifier_guidance_gives_the_exact_conditional_denoiser(dims, sigma):
    mu = [[-1.5, 0.5][:dims], [1.0, -0.7][:dims]]
    mix = GaussianMixture([0.3, 0.7], mu, [0.4, 0.8])
    x = torch.randn(200, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x * math.sqrt(1 + sigma**2)
    labels = torch.arange(200) % 2
    with torch.no_grad():
        guided = classifier_guided(mix.denoiser, mix, labels, 1.0)(x, sigma)
        exact = mix.conditional_denoiser(x, sigma, labels)
        unguided = mix.denoiser(x, sigma)
    assert (unguided - exact).abs().max() > 1e-3 or sigma < 0.05  # guidance has work to do
    assert torch.allclose(guided, exact, rtol=1e-9, atol=1e-9)


def test_guidance_scale_sharpens_the_posterior():
    """At scale s the shift is s times the s = 1 shift: D + s (E[x_0 | x, y] - D)."""
    mix = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.5, 0.5])
    x, labels, sigma = torch.linspace(-3, 3, 50, dtype=torch.float64)[:, None], \
        torch.zeros(50, dtype=torch.long), 0.8
    with torch.no_grad():
        d = mix.denoiser(x, sigma)
        target = mix.conditional_denoiser(x, sigma, labels)
        out = classifier_guided(mix.denoiser, mix, labels, 4.0)(x, sigma)
    assert torch.allclose(out, d + 4.0 * (target - d), rtol=1e-9, atol=1e-9)


# --- training the noisy classifier --------------------------------------------------------------

def eight_gaussians_labelled():
    """8gaussians with the index of the nearest mode as the label."""
    data = load_dataset("8gaussians")
    angles = torch.arange(8) * math.pi / 4
    centres = 4 * torch.stack([angles.cos(), angles.sin()], 1) / math.sqrt(2)

    def label(x):
        return torch.cdist(x, centres).argmin(1)

    return data.x_train, label(data.x_train), data.x_test, label(data.x_test)


@torch.no_grad()
def accuracy_at(clf, x, y, sigma, seed=0):
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    predicted = clf(x + sigma * eps, torch.full((len(x),), sigma)).argmax(1)
    return float((predicted == y).float().mean())


def test_noisy_classifier_learns_the_modes_of_8gaussians():
    x, y, x_test, y_test = eight_gaussians_labelled()
    clf = train_noisy_classifier(x, y, 8, steps=300, seed=0, progress=False)
    assert not clf.training
    clean, noisy = accuracy_at(clf, x_test, y_test, 0.01), accuracy_at(clf, x_test, y_test, 80.0)
    assert clean > 0.9  # chance is 1/8; nearest-mode labels are a function of x_0
    assert noisy < 0.4  # at sigma = 80 the modes (radius 2.8) cannot be told apart
    assert accuracy_at(clf, x_test, y_test, 1.0) < clean


def test_training_is_seeded_and_the_loss_is_cross_entropy_at_init():
    x, y, *_ = eight_gaussians_labelled()
    a = train_noisy_classifier(x[:256], y[:256], 8, steps=3, seed=4, progress=False)
    b = train_noisy_classifier(x[:256], y[:256], 8, steps=3, seed=4, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
    torch.manual_seed(0)
    fresh = NoisyClassifier((2,), 8)
    torch.nn.init.zeros_(fresh.mlp[-1].weight)
    torch.nn.init.zeros_(fresh.mlp[-1].bias)
    loss = noisy_classifier_loss(fresh, x[:64], y[:64], torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(8), rel=1e-6)  # uniform logits


# --- saving, loading and errors -----------------------------------------------------------------

@pytest.mark.parametrize("shape,classes", [((2,), 3), ((1, 8, 8), 10), ((1, 28, 28), 10)])
def test_save_load_round_trip(tmp_path, shape, classes):
    clf = NoisyClassifier(shape, classes, width=8, sigma_data=0.7).eval()
    path = tmp_path / "clf.safetensors"
    save_noisy_classifier(clf, path)
    loaded = load_noisy_classifier(path)
    assert loaded.config == clf.config
    x, sigma = torch.randn(4, *shape), torch.tensor([0.01, 0.5, 3.0, 70.0])
    assert torch.equal(loaded(x, sigma), clf(x, sigma))
    assert [p.name for p in tmp_path.iterdir()] == ["clf.safetensors"]  # no temporary left


def test_loading_a_file_that_is_no_classifier(tmp_path):
    path = tmp_path / "other.safetensors"
    save_tensors(path, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="holds no noisy classifier"):
        load_noisy_classifier(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_noisy_classifier(tmp_path / "missing.safetensors")


def test_clear_errors_for_bad_labels_and_shapes():
    clf = NoisyClassifier((2,), 3)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        classifier_guided(shrink, clf, torch.tensor([0, 3]), 1.0)
    with pytest.raises(ValueError, match="1-d tensor"):
        classifier_guided(shrink, clf, torch.zeros(2, 1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="integer class indices"):
        classifier_guided(shrink, clf, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="finite"):
        classifier_guided(shrink, clf, torch.zeros(2, dtype=torch.long), math.nan)
    with pytest.raises(ValueError, match="2 labels for a batch of 5"):
        classifier_guided(shrink, clf, torch.zeros(2, dtype=torch.long), 1.0)(
            torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match=r"samples of shape \(2,\), got \(3,\)"):
        clf(torch.randn(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match=r"sigma must have shape \(4,\)"):
        clf(torch.randn(4, 2), torch.ones(4, 1))
    with pytest.raises(ValueError, match="y must lie in 0..2"):
        noisy_classifier_loss(clf, torch.randn(4, 2), torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="3 y for a batch of 4"):
        train_noisy_classifier(torch.randn(4, 2), torch.tensor([0, 1, 2]), 3, steps=1)
    with pytest.raises(ValueError, match="sample_shape"):
        NoisyClassifier((8, 8), 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        NoisyClassifier((2,), 1)


def test_for_data_fits_the_dataset():
    digits = load_dataset("digits")
    clf = NoisyClassifier.for_data(digits, width=8)
    assert clf.config == {"sample_shape": [1, 8, 8], "num_classes": 10, "width": 8,
                          "sigma_data": 0.5}
    assert clf(digits.x_test[:3], torch.ones(3)).shape == (3, 10)
    with pytest.raises(ValueError, match="8gaussians has no class labels"):
        NoisyClassifier.for_data(load_dataset("8gaussians"))


def test_guidance_at_sigma_zero_is_the_denoiser():
    clf = NoisyClassifier((2,), 3)
    x = torch.randn(4, 2)
    out = classifier_guided(shrink, clf, torch.tensor([0, 1, 2, 0]), 3.0)(x, 0.0)
    assert torch.equal(out, shrink(x, 0.0))


# --- diversity ----------------------------------------------------------------------------------

def test_class_spread_matches_a_loop_over_pairs():
    features, labels = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 4, (30,))
    labels[labels == 3] = 2  # class 3 is empty
    labels[0], labels[1:] = 3, labels[1:].clamp(max=2)  # class 3 has a single member
    spread = class_spread(features, labels, 4)
    for c in range(3):
        rows = features[labels == c]
        pairs = [(rows[i] - rows[j]).norm() for i in range(len(rows)) for j in range(len(rows))
                 if i != j]
        assert spread[c].item() == pytest.approx(float(torch.stack(pairs).mean()), rel=1e-9)
    assert spread[3].isnan()


def test_diversity_is_one_for_real_images_and_zero_for_copies():
    data = load_dataset("digits")
    assert diversity(data.x_test, data.y_test, data)["diversity"] == pytest.approx(1.0)
    # one image per class, repeated: no spread within any label
    first = torch.stack([data.x_test[data.y_test == c][0] for c in range(10)])
    labels = torch.arange(10).repeat(5)
    assert diversity(first[labels], labels, data)["diversity"] == pytest.approx(0.0, abs=1e-6)
    # labels shuffled away from the images: each label holds every class, more spread than real
    shuffled = data.y_test[torch.randperm(len(data.y_test))]
    assert diversity(data.x_test, shuffled, data)["diversity"] > 1.1
