"""Stochastic approximation (Zhao, Chapter 6): Robbins-Monro, mean estimation, SGD/BGD/MBGD."""

import json
import math

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.config import ConfigError
from mlatlas.core.optim import inverse_power
from mlatlas.core.run import NonFiniteLossError, Run
from mlatlas.rl.tabular import stochastic_approx as sa

# Theory ----------------------------------------------------------------------------------------


def test_step_size_conditions_of_theorem_6_1():
    """a_k = c / k^p: sum a_k = inf needs p <= 1, sum a_k^2 < inf needs p > 1/2."""
    assert sa.satisfies_theorem_6_1(1.0) and sa.satisfies_theorem_6_1(0.6)
    assert not sa.satisfies_theorem_6_1(0.0)  # constant step
    assert not sa.satisfies_theorem_6_1(0.5)  # sum 1/k diverges
    assert not sa.satisfies_theorem_6_1(2.0)  # sum 1/k^2 = pi^2/6 is finite
    assert inverse_power(2.0, 4, 0.5) == 1.0
    partial = sum(inverse_power(1.0, k, 2.0) for k in range(1, 100_001))
    assert partial == pytest.approx(math.pi**2 / 6, abs=1e-4)  # the Basel problem


def test_rm_noiseless_tanh_moves_towards_root_monotonically():
    """Figure 6.4: g(w) = tanh(w - 1), w_1 = 3, a_k = 1/k, eta = 0: every iterate is closer."""
    g, root, _ = sa.PROBLEMS["tanh"]
    w = torch.tensor([3.0, -1.0], dtype=torch.float64)
    for k in range(1, 200):
        w_next = sa.robbins_monro_step(w, g(w), 1.0 / k)
        assert ((w_next - root).abs() < (w - root).abs()).all()
        w = w_next
    assert (w - root).abs().max() < 0.05
    step = sa.robbins_monro_step(torch.tensor(2.0), torch.tensor(0.5), 0.1)
    assert step.item() == pytest.approx(1.95)


def _rm(cfg, tmp_path):
    run = sa.train_robbins_monro(cfg, Run.create("robbins_monro", cfg, root=tmp_path),
                                 progress=False)
    return run, run.summary()


def test_rm_converges_to_root_with_noise(tmp_path):
    """Theorem 6.1: with Gaussian noise and a_k = 1/k, |w_k - w*| -> 0 in every run; the mean
    error at k = 2000 is close to the sigma / sqrt(k) of the linearised recursion."""
    cfg = sa.RobbinsMonroConfig(steps=2000, runs=500, log_every=500)
    _, summary = _rm(cfg, tmp_path)
    assert summary["train/step_size_conditions_hold"]
    assert abs(summary["eval/final_w_mean"] - 1.0) < 0.01
    expected = math.sqrt(2 / math.pi) / math.sqrt(2000)  # E|N(0, 1/k)|
    assert summary["eval/final_error_mean"] == pytest.approx(expected, rel=0.25)
    assert summary["eval/final_error_max"] < 0.1


def test_rm_constant_step_keeps_fluctuating(tmp_path):
    """a_k = 0.1 breaks sum a_k^2 < inf: the error settles at a floor instead of shrinking
    (stationary spread sqrt(a / (2 - a)) ~ 0.23 for g'(w*) = 1, unit noise)."""
    errors = []
    for steps in (500, 2000):
        cfg = sa.RobbinsMonroConfig(steps=steps, runs=500, step_scale=0.1, step_power=0.0,
                                    log_every=500)
        _, summary = _rm(cfg, tmp_path)
        assert not summary["train/step_size_conditions_hold"]
        errors.append(summary["eval/final_error_mean"])
    floor = math.sqrt(0.1 / 1.9) * math.sqrt(2 / math.pi)
    assert errors[0] == pytest.approx(floor, rel=0.2)
    assert errors[1] == pytest.approx(floor, rel=0.2)  # no progress from k = 500 to 2000


def test_rm_step_too_small_stalls_before_root(tmp_path):
    """a_k = 1/k^2 breaks sum a_k = inf: |w_1 - w_inf| <= sum a_k |g~| (eq. 6.6). Without noise
    w can move at most pi^2/6 < 2 = |w_1 - w*| from w_1 = 3, so it never reaches the root."""
    cfg = sa.RobbinsMonroConfig(steps=2000, runs=10, step_power=2.0, noise_std=0.0)
    run, summary = _rm(cfg, tmp_path)
    assert summary["eval/final_w_mean"] >= 3.0 - math.pi**2 / 6
    assert summary["eval/final_error_mean"] > 0.3
    # It has stopped moving: the last logged rows barely differ.
    rows = run.metrics
    assert abs(rows[-1]["w_mean"] - rows[-2]["w_mean"]) < 1e-3
    cfg_noisy = sa.RobbinsMonroConfig(steps=2000, runs=500, step_power=2.0)
    _, noisy = _rm(cfg_noisy, tmp_path)
    assert noisy["eval/final_error_mean"] > 0.5  # and noise does not rescue it


def test_rm_cubic_converges_from_a_good_start(tmp_path):
    """Figure 6.3's g(w) = w^3 - 5 (root 5^(1/3)): its derivative is unbounded, so Theorem 6.1
    does not apply; from w_1 = 1.5 with a_k = 0.05/k it still converges."""
    cfg = sa.RobbinsMonroConfig(problem="cubic", w1=1.5, step_scale=0.05, steps=2000, runs=200)
    _, summary = _rm(cfg, tmp_path)
    assert summary["train/root"] == pytest.approx(5 ** (1 / 3))
    assert summary["eval/final_error_mean"] < 0.02


def test_rm_cubic_from_the_books_start_diverges(tmp_path):
    """Figure 6.3's setting (w_1 = 0, a_k = 1/k) is not reproducible: w_2 = 5 - eta_1, g(5) = 120
    throws w_3 to about -55 and the iterates blow up; the run stops at the first non-finite
    metric instead of writing garbage."""
    cfg = sa.RobbinsMonroConfig(problem="cubic", w1=0.0, steps=50, runs=10)
    with pytest.raises(NonFiniteLossError):
        _rm(cfg, tmp_path)


def test_rm_single_noiseless_run_figure_6_4(tmp_path):
    cfg = sa.RobbinsMonroConfig(noise_std=0.0, runs=1, steps=200, log_every=50)
    _, summary = _rm(cfg, tmp_path)
    assert summary["eval/final_error_mean"] < 0.05 and summary["eval/final_error_std"] == 0


def test_mean_estimation_with_1_over_k_is_the_sample_mean():
    """Eq. 6.3: w_{k+1} = w_k - (1/k)(w_k - x_k) gives w_{k+1} = (1/k) sum_{i<=k} x_i, whatever
    w_1 is (here 7)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64) * 3 + 1
    w = sa.mean_estimation(x, w1=7.0)
    k = torch.arange(1, 2001, dtype=torch.float64)[:, None]
    assert torch.allclose(w, x.cumsum(0) / k, rtol=0, atol=1e-12)
    # The worked steps of Section 6.1: w_2 = x_1, w_3 = (x_1 + x_2)/2.
    assert torch.allclose(w[0], x[0], rtol=0, atol=1e-15)
    assert torch.allclose(w[1], (x[0] + x[1]) / 2, atol=1e-15)


def test_mean_estimation_other_step_sizes():
    """A constant alpha weights recent samples geometrically: w_{K+1} = (1-a)^K w_1 +
    sum_k a (1-a)^(K-k) x_k; it is not the sample mean."""
    x = torch.arange(1.0, 6.0, dtype=torch.float64)
    a = 0.3
    w = sa.mean_estimation(x, alpha=lambda k: a, w1=2.0)[-1]
    expected = (1 - a) ** 5 * 2.0 + sum(a * (1 - a) ** (5 - k) * x[k - 1] for k in range(1, 6))
    assert w.item() == pytest.approx(expected.item(), abs=1e-12)
    assert abs(w.item() - x.mean().item()) > 0.1


def test_mean_estimation_run_matches_sample_mean_and_converges(tmp_path):
    cfg = sa.MeanEstimationConfig(steps=400, runs=300, log_every=100)
    run = sa.train_mean_estimation(cfg, Run.create("mean_estimation", cfg, root=tmp_path),
                                   progress=False)
    summary = run.summary()
    assert summary["eval/max_gap_to_sample_mean"] < 1e-12
    assert max(r["gap_to_sample_mean"] for r in run.metrics) < 1e-12
    # E|w - E[X]| = std sqrt(2 / (pi k)) for the sample mean of k samples.
    expected = cfg.std * math.sqrt(2 / (math.pi * cfg.steps))
    assert summary["eval/final_error_mean"] == pytest.approx(expected, rel=0.2)


def test_gd_steps_for_mean_estimation():
    """Section 6.4.4: BGD uses x_bar, MBGD the batch mean, SGD one sample; MBGD on the whole set
    (without replacement) is BGD; with replacement m = n generally is not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 2, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2, generator=g, dtype=torch.float64)
    x_bar = x.mean(dim=1)
    assert torch.allclose(sa.bgd_step(w, x, 0.3), w - 0.3 * (w - x_bar))
    everything = sa.sample_batch_indices(4, 10, 10, g, replace=False)
    assert (everything.sort(dim=1).values == torch.arange(10)).all()
    assert torch.allclose(sa.mbgd_step(w, x, everything, 0.3), sa.bgd_step(w, x, 0.3),
                          atol=1e-15)
    with_replacement = sa.sample_batch_indices(4, 10, 10, g, replace=True)
    assert not torch.allclose(sa.mbgd_step(w, x, with_replacement, 0.3),
                              sa.bgd_step(w, x, 0.3))
    assert torch.allclose(sa.sgd_step(w, x[:, 3], 0.3), w - 0.3 * (w - x[:, 3]))
    one = torch.full((4, 1), 3)
    assert torch.allclose(sa.mbgd_step(w, x, one, 0.3), sa.sgd_step(w, x[:, 3], 0.3))


def test_gd_closed_forms_with_alpha_1_over_k():
    """With alpha_k = 1/k: BGD w_{k+1} = x_bar from k = 1 on; MBGD w_{k+1} = (1/k) sum_j
    x_bar_j^(m); SGD w_{k+1} = (1/k) sum_j x_j."""
    g = torch.Generator().manual_seed(2)
    R, n, m, K = 3, 20, 5, 50
    x = torch.rand(R, n, 2, generator=g, dtype=torch.float64)
    w_bgd = w_mbgd = w_sgd = torch.full((R, 2), 9.0, dtype=torch.float64)
    batch_means, singles = [], []
    for k in range(1, K + 1):
        w_bgd = sa.bgd_step(w_bgd, x, 1.0 / k)
        assert torch.allclose(w_bgd, x.mean(dim=1), atol=1e-12)
        index = sa.sample_batch_indices(R, n, m, g)
        batch_means.append(x.gather(1, index[..., None].expand(-1, -1, 2)).mean(dim=1))
        w_mbgd = sa.mbgd_step(w_mbgd, x, index, 1.0 / k)
        i = sa.sample_batch_indices(R, n, 1, g)[:, 0]
        singles.append(x[torch.arange(R), i])
        w_sgd = sa.sgd_step(w_sgd, singles[-1], 1.0 / k)
    assert torch.allclose(w_mbgd, torch.stack(batch_means).mean(dim=0), atol=1e-12)
    assert torch.allclose(w_sgd, torch.stack(singles).mean(dim=0), atol=1e-12)


# Behaviour -------------------------------------------------------------------------------------


def test_sgd_comparison_figure_6_5(tmp_path):
    """Figure 6.5 (X uniform in the square of side 20, n = 100, w_1 = (-20, 20), alpha_k = 1/k):
    BGD is at the sample mean after one step; MBGD with m = 50 ends closest, then m = 5, then
    SGD, and all of them are within a few units after 30 iterations."""
    cfg = sa.SGDComparisonConfig(runs=300)
    run = sa.train_sgd_comparison(cfg, Run.create("sgd_comparison", cfg, root=tmp_path),
                                  progress=False)
    summary = run.summary()
    final = {name: summary[f"eval/final_distance_mean_{name}"]
             for name in ("bgd", "sgd", "mbgd_5", "mbgd_50")}
    assert final["bgd"] < 1e-12
    assert final["mbgd_50"] < final["mbgd_5"] < final["sgd"] < 3.0
    # SGD with alpha_k = 1/k is the mean of k draws: E||.||^2 = 2 var / k, var ~ 20^2 / 12.
    assert final["sgd"] == pytest.approx(math.sqrt(2 * 400 / 12 / 30) * 0.886, rel=0.2)
    rows = run.metrics
    assert rows[0]["distance_sgd"] < 10 < math.hypot(20, 20)  # one step leaves the far start
    assert (tmp_path / run.dir.name / "comparison.png").is_file()


# Interface -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,flags", [
    ("robbins_monro", ["--steps", "50", "--runs", "20"]),
    ("mean_estimation", ["--steps", "50", "--runs", "20"]),
    ("sgd_comparison", ["--steps", "10", "--runs", "20"]),
])
def test_cli_smoke(name, flags, tmp_path):
    assert main(["train", name, *flags, "--out", str(tmp_path), "--no-progress"]) == 0
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train/iterations"] == int(flags[1])
    assert list(run_dir.glob("*.png")) and (run_dir / "metrics.csv").is_file()


@pytest.mark.parametrize("cls,train,kwargs", [
    (sa.RobbinsMonroConfig, sa.train_robbins_monro, {"runs": 50}),
    (sa.MeanEstimationConfig, sa.train_mean_estimation, {"runs": 50}),
    (sa.SGDComparisonConfig, sa.train_sgd_comparison, {"runs": 50}),
])
def test_resume_equals_uninterrupted(cls, train, kwargs, tmp_path):
    """Stop after 20 iterations, resume to 60 with more steps: the iterates, the samples and the
    recorded histories equal those of one uninterrupted 60-step run."""
    full_cfg = cls(steps=60, ckpt_every=7, **kwargs)
    full = train(full_cfg, Run.create("x", full_cfg, root=tmp_path / "a"), progress=False)
    part_cfg = cls(steps=20, ckpt_every=7, **kwargs)
    part = train(part_cfg, Run.create("x", part_cfg, root=tmp_path / "b"), progress=False)
    resumed = train(cls(steps=60, ckpt_every=7, **kwargs), Run.open(part.dir), progress=False)
    from mlatlas.core.io import load_tensors

    a = load_tensors(full.path("checkpoint.safetensors"))
    b = load_tensors(resumed.path("checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].nan_to_num(-1.0), b[key].nan_to_num(-1.0)), key
    assert full.summary() == resumed.summary()


def test_bad_configs():
    with pytest.raises(ConfigError, match="step-power"):
        sa.RobbinsMonroConfig(step_power=-1)
    with pytest.raises(ConfigError, match="noise-std"):
        sa.RobbinsMonroConfig(noise_std=-0.1)
    with pytest.raises(ConfigError, match="batch-sizes"):
        sa.SGDComparisonConfig(batch_sizes="1,x")
    with pytest.raises(ConfigError, match="batch-sizes"):
        sa.SGDComparisonConfig(batch_sizes="5,5")
    with pytest.raises(ConfigError, match="cannot exceed"):
        sa.SGDComparisonConfig(batch_sizes="200", replace=False)
    with pytest.raises(ConfigError, match="runs"):
        sa.MeanEstimationConfig(runs=0)
