"""Autoregressive models of binary images: the autoregressive property by gradients, exact
normalisation by enumeration, NADE's recursion, exact sampling, the blind spot, bad input, and
(slow) held-out NLL against the pixel-independent baseline."""

import itertools
import math

import pytest
import torch

from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.generative import likelihood
from mlatlas.generative.autoregressive import fvsbn, made, nade, pixelcnn
from mlatlas.generative.autoregressive.common import bernoulli_log_prob
from mlatlas.generative.autoregressive.made import MADE, made_degrees, made_masks
from mlatlas.generative.autoregressive.nade import NADE, nade_logits
from mlatlas.generative.autoregressive.pixelcnn import GatedPixelCNN, PixelCNN, raster_mask
from mlatlas.registry import METHODS

SHAPE = (1, 3, 4)  # D = 12: 4,096 images to enumerate


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised weights would hide a leak)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def models(shape=SHAPE, num_classes=0):
    return {
        "fvsbn": fvsbn.FVSBN(shape, num_classes),
        "nade": NADE(shape, 7, num_classes),
        "nade_relu": NADE(shape, 7, num_classes, activation="relu"),
        "made": MADE(shape, (9, 9), 1, 0, num_classes=num_classes),
        "made_natural": MADE(shape, (9,), 1, 0, natural_order=True, num_classes=num_classes),
        "pixelcnn": PixelCNN(shape, 4, 2, num_classes),
        "gated_pixelcnn": GatedPixelCNN(shape, 4, 3, num_classes=num_classes),
    }


def _jacobian(logits_fn, shape) -> torch.Tensor:
    x = torch.rand(1, *shape, dtype=torch.float64)
    d = math.prod(shape)
    return torch.autograd.functional.jacobian(
        lambda v: logits_fn(v.view(1, *shape)).reshape(d), x.reshape(d))


def _positions(order: torch.Tensor) -> torch.Tensor:
    return torch.argsort(order)


@pytest.mark.parametrize("name", list(models()))
def test_output_i_depends_on_no_input_at_or_after_i(name):
    model = _randomise(models()[name]).double()
    logit_fns = [(model.logits, model.order())]
    if isinstance(model, MADE):
        logit_fns = [(lambda v, k=k: model.masked_logits(v, None, k), model.order(k))
                     for k in range(model.num_masks)]
    for fn, order in logit_fns:
        jac = _jacobian(fn, SHAPE).abs()
        pos = _positions(order)
        later = pos[None, :] >= pos[:, None]   # input j at or after output i
        assert (jac[later] == 0).all()
        assert (jac[~later] > 0).any()         # and it does use the earlier pixels


def test_made_with_many_masks_is_autoregressive_under_each_mask():
    model = _randomise(MADE(SHAPE, (16, 16), 4, 3)).double()
    orders = {tuple(model.order(k).tolist()) for k in range(4)}
    assert len(orders) == 4
    for k in range(4):
        jac = _jacobian(lambda v, k=k: model.masked_logits(v, None, k), SHAPE).abs()
        pos = _positions(model.order(k))
        assert (jac[pos[None, :] >= pos[:, None]] == 0).all()


def test_made_masks_follow_the_degree_rule():
    degrees = made_degrees(5, (6, 4), torch.Generator().manual_seed(0))
    masks = made_masks(degrees)
    assert sorted(degrees[0].tolist()) == [1, 2, 3, 4, 5]
    assert all(int(d.min()) >= 1 and int(d.max()) <= 4 for d in degrees[1:])
    for mask, prev, cur in zip(masks[:-1], degrees[:-1], degrees[1:], strict=True):
        assert torch.equal(mask, (cur[:, None] >= prev[None, :]).float())
    assert torch.equal(masks[-1], (degrees[0][:, None] > degrees[-1][None, :]).float())


def _all_images(shape) -> torch.Tensor:
    d = math.prod(shape)
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)))
    return bits.view(-1, *shape)


@pytest.mark.parametrize("name", list(models()))
def test_probabilities_sum_to_one_over_all_two_to_the_d_images(name):
    model = _randomise(models()[name]).double()
    x = _all_images(SHAPE).double()
    total = torch.logsumexp(model.log_prob(x), 0).exp()
    assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_conditional_models_and_the_made_ensemble_are_normalised_for_each_label():
    x = _all_images(SHAPE).double()
    ensemble = _randomise(MADE(SHAPE, (8,), 3, 0)).double()
    assert torch.logsumexp(ensemble.log_prob(x), 0).exp().item() == pytest.approx(1, abs=1e-9)
    for name, model in models(num_classes=3).items():
        model = _randomise(model).double()
        for label in range(3):
            y = torch.full((len(x),), label)
            total = torch.logsumexp(model.log_prob(x, y), 0).exp().item()
            assert total == pytest.approx(1.0, abs=1e-9), (name, label)
        # The label matters: p(x | 0) differs from p(x | 1).
        y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
        assert not torch.allclose(model.log_prob(x[:4], y0), model.log_prob(x[:4], y1))


def test_nade_recursion_equals_the_naive_hidden_layer_of_each_conditional():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((5, 9), 0.5)).double()
    W, c = torch.randn(4, 9).double(), torch.randn(4).double()
    V, b = torch.randn(9, 4).double(), torch.randn(9).double()
    naive = torch.stack([torch.sigmoid(c + x[:, :i] @ W[:, :i].T) @ V[i] + b[i]
                         for i in range(9)], 1)
    assert torch.allclose(nade_logits(x, W, c, V, b), naive, atol=1e-12)
    model = _randomise(NADE((1, 3, 3), 4)).double()
    naive_model = torch.stack([
        torch.sigmoid(model.c + x[:, :i] @ model.W[:, :i].T) @ model.V[i] + model.b[i]
        for i in range(9)], 1)
    assert torch.allclose(model.logits(x.view(5, 1, 3, 3)).flatten(1), naive_model, atol=1e-12)


def test_fvsbn_is_one_logistic_regression_per_pixel():
    model = _randomise(fvsbn.FVSBN((1, 2, 2))).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]]).double().view(1, 1, 2, 2)
    w, b = model.weight, model.bias
    by_hand = sum(
        math.log(torch.sigmoid(b[i] + (w[i, :i] * x.flatten()[:i]).sum()).item()
                 if x.flatten()[i] else 1 - torch.sigmoid(b[i] + (w[i, :i] * x.flatten()[:i])
                                                          .sum()).item())
        for i in range(4))
    assert model.log_prob(x).item() == pytest.approx(by_hand, abs=1e-12)


def test_bernoulli_log_prob_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    x = torch.tensor([[1.0, 0.0, 1.0]])
    by_hand = math.log(0.5) + math.log(1 - 1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.e))
    assert bernoulli_log_prob(logits, x).item() == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("name", ["fvsbn", "nade", "made", "made_ensemble", "gated_pixelcnn"])
def test_ancestral_samples_follow_the_model_distribution(name):
    shape = (1, 1, 3)
    model = {"fvsbn": fvsbn.FVSBN(shape), "nade": NADE(shape, 5), "made": MADE(shape, (6,), 1, 0),
             "made_ensemble": MADE(shape, (6,), 3, 2),
             "gated_pixelcnn": GatedPixelCNN(shape, 4, 2)}[name]
    model = _randomise(model)
    n = 40_000
    x = model.sample(n, torch.Generator().manual_seed(0))
    codes = (x.flatten(1) * torch.tensor([4.0, 2.0, 1.0])).sum(1).long()
    freq = torch.bincount(codes, minlength=8).double() / n
    with torch.no_grad():
        p = model.log_prob(_all_images(shape)).double().exp()
    # Three standard errors of a frequency at n = 40,000 is at most 0.0075.
    assert (freq - p).abs().max().item() < 0.0075


def test_temperature_sharpens_the_conditionals():
    model = _randomise(fvsbn.FVSBN((1, 4, 4)))
    cold = model.sample(2000, torch.Generator().manual_seed(0), temperature=0.1)
    warm = model.sample(2000, torch.Generator().manual_seed(0), temperature=1.0)
    # At T -> 0 the first pixel is the argmax of its marginal in almost every sample.
    first = float(torch.sigmoid(model.bias[0]) > 0.5)
    assert (cold[:, 0, 0, 0] == first).float().mean() > 0.99
    assert (warm[:, 0, 0, 0] == first).float().mean() < 0.99


def test_raster_masks():
    assert raster_mask(3, "A").tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert raster_mask(3, "B").tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def _unseen(model, r: int, c: int, side: int) -> set[tuple[int, int]]:
    """The pixels before (r, c) in raster order whose value cannot reach output (r, c)."""
    jac = _jacobian(model.logits, (1, side, side)).abs()[r * side + c].view(side, side)
    return {(i, j) for i in range(side) for j in range(side)
            if i * side + j < r * side + c and jac[i, j] == 0}


def test_pixelcnn_has_a_blind_spot_and_the_gated_stacks_have_none():
    side = 10
    # Default initialisation: random weights as large as _randomise's saturate six gates.
    plain = PixelCNN((1, side, side), 4, 5).double()
    gated = GatedPixelCNN((1, side, side), 4, 6).double()
    # Six layers of each: the gated stacks see every earlier pixel of output (9, 5); PixelCNN
    # misses (8, 9), up and to the right, though it sees (8, 8) beside it and all of row 7.
    assert _unseen(gated, 9, 5, side) == set()
    missing = _unseen(plain, 9, 5, side)
    assert (8, 9) in missing and (8, 8) not in missing
    assert not {(7, j) for j in range(side)} & missing


def test_a_bernoulli_model_refuses_grey_levels_and_points(tmp_path):
    with pytest.raises(ConfigError, match="binary images.*digits-binary"):
        fvsbn.Config(dataset="digits").check_data()
    with pytest.raises(ConfigError, match="holds points"):
        nade.Config(dataset="two-moons").check_data()
    with pytest.raises(ValueError, match="0 or 1"):
        fvsbn.FVSBN((1, 2, 2)).log_prob(torch.full((1, 1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="shape"):
        fvsbn.FVSBN((1, 2, 2)).log_prob(torch.ones(1, 1, 3, 3))
    with pytest.raises(ConfigError, match="--channels must be even"):
        pixelcnn.Config(channels=5)
    with pytest.raises(ConfigError, match="--num-masks must be at least 1"):
        made.Config(num_masks=0)


def test_static_binarisation_is_fixed_by_its_seed_and_dynamic_redraws():
    a = likelihood.load_data(fvsbn.Config(dataset="digits-binary"))
    b = likelihood.load_data(fvsbn.Config(dataset="digits-binary", seed=5))
    c = likelihood.load_data(fvsbn.Config(dataset="digits-binary", binarize_seed=1))
    assert torch.equal(a.dataset.x_train, b.dataset.x_train)
    assert not torch.equal(a.dataset.x_train, c.dataset.x_train)
    assert a.grey_train is None
    dynamic = likelihood.load_data(fvsbn.Config(dataset="digits-binary", binarize="dynamic"))
    assert dynamic.grey_train is not None and torch.equal(dynamic.dataset.x_test,
                                                          a.dataset.x_test)
    threshold = likelihood.load_data(fvsbn.Config(dataset="digits-binary",
                                                  binarize="threshold"))
    assert torch.equal(threshold.dataset.x_train,
                       (dynamic.grey_train > 0.5).float())


def test_a_short_run_learns_and_reports_nats_and_bits_per_dim(runs):
    cfg = fvsbn.Config(steps=60, log_every=20, eval_samples=8)
    run = likelihood.train(cfg, Run.create("fvsbn", cfg, root=runs), progress=False)
    summary = run.summary()
    nll, dims = summary["eval/test_nll_nats"], summary["eval/dims"]
    assert dims == 64
    assert summary["eval/test_bits_per_dim"] == pytest.approx(nll / (64 * math.log(2)))
    # An untrained FVSBN gives every image 2^-64: 44.4 nats.
    assert nll < 64 * math.log(2) - 10
    assert "exact" in summary["eval/formula"]
    assert (run.dir / "samples.png").is_file()
    x = likelihood.sample(run, 5, seed=3)
    assert x.shape == (5, 1, 8, 8) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x, likelihood.sample(run, 5, seed=3))


def test_every_autoregressive_method_is_registered():
    names = {m for m, method in METHODS.items() if method.family == "generative/autoregressive"}
    assert {"fvsbn", "nade", "made", "pixelcnn", "gated_pixelcnn"} <= names


# --- behaviour -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["fvsbn", "nade", "made", "pixelcnn", "gated_pixelcnn"])
def test_each_model_beats_the_pixel_independent_baseline_by_a_wide_margin(name, runs):
    method = METHODS[name]
    untrained_cfg = method.config_cls(steps=1, eval_samples=0, lr=1e-9)
    untrained = likelihood.train(untrained_cfg, Run.create(name, untrained_cfg, root=runs),
                                 progress=False)
    likelihood.evaluate(untrained, n=0)
    cfg = method.config_cls(eval_samples=0)
    run = likelihood.train(cfg, Run.create(name, cfg, root=runs), progress=False)
    trained = likelihood.evaluate(run, n=0)
    before = untrained.summary()["eval/test_nll_nats"]
    assert trained["test_nll_nats"] < before - 15
    assert trained["test_nll_nats"] < trained["baseline_nll_nats"] - 2.0, trained
