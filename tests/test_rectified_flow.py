"""Rectified flow: the reflow loss and pairs by hand, straightness against its closed form, the
stage boundary (1-RF = flow matching, exact resume across the reflow) and a short toy run in
which the reflow makes one Euler step good."""

import dataclasses
import math

import pytest
import torch

from mlatlas.core.config import ConfigError, field_docs
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run
from mlatlas.eval.metrics import mmd_rbf
from mlatlas.generative.diffusion import configs, loop
from mlatlas.generative.flow_matching import flow_matching
from mlatlas.generative.flow_matching import rectified_flow as rf
from mlatlas.generative.flow_matching.flow_matching import times


def gaussian_velocity(m: torch.Tensor, s: torch.Tensor):
    """The exact 1-RF velocity E[z - x_0 | x_t = x] for x_0 ~ N(m, diag(s^2)), z ~ N(0, I):
    x_t is Gaussian with mean (1 - t) m and variance (1 - t)^2 s^2 + t^2 per dimension."""
    def v(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        return -m + (t - (1 - t) * s**2) / var * (x - (1 - t) * m)

    return v


def unit_normal_grid(n: int, dims: int) -> torch.Tensor:
    """Normal quantiles (so Monte Carlo noise does not blur the comparison), scaled to exact unit
    second moments in each dimension, dimensions in different orders."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = math.sqrt(2) * torch.erfinv(2 * u - 1)
    z = torch.stack([q.roll(17 * k) for k in range(dims)], 1)
    return z / z.pow(2).mean(0).sqrt()


# --- the maths by hand -------------------------------------------------------------------------

def test_reflow_loss_by_hand():
    x0_hat = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    z = torch.tensor([[0.5, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    zero = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
    # v = 0: the loss is the mean squared length of the pairs' chords z - x0_hat, whatever t.
    loss = rf.reflow_loss(zero, x0_hat, z, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx((z - x0_hat).pow(2).mean().item())
    # v(x, t) = x: the loss needs the pair's own x_t = (1 - t) x0_hat + t z.
    t = torch.rand(3, generator=torch.Generator().manual_seed(1))
    x_t = (1 - t[:, None]) * x0_hat + t[:, None] * z
    want = (x_t - (z - x0_hat)).pow(2).mean()
    ident = lambda x, t, y=None: x  # noqa: E731
    got = rf.reflow_loss(ident, x0_hat, z, torch.Generator().manual_seed(1))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="must match"):
        rf.reflow_loss(zero, x0_hat, z[:2], torch.Generator())


def test_reflow_pairs_by_hand_and_for_the_gaussian_flow():
    z = torch.randn(50, 2, dtype=torch.float64)
    c = torch.tensor([0.3, -2.0], dtype=torch.float64)
    constant = lambda x, t: c.expand_as(x)  # noqa: E731
    # Constant velocity: every solver lands on z - c, in one step or many, in chunks or not.
    for sampler, steps, chunk in (("euler", 1, 1000), ("heun", 7, 8)):
        got = rf.reflow_pairs(constant, z, times(steps), sampler, chunk=chunk)
        assert torch.allclose(got, z - c, atol=1e-12)
    # The exact 1-RF of Gaussian data maps z to m + s z (Z_t = (1 - t) m + sigma_t z).
    m, s = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 2.0],
                                                                        dtype=torch.float64)
    heun = rf.reflow_pairs(gaussian_velocity(m, s), z, times(64), "heun", chunk=16)
    euler = rf.reflow_pairs(gaussian_velocity(m, s), z, times(64), "euler")
    heun_error, euler_error = ((x - (m + s * z)).abs().max() for x in (heun, euler))
    assert heun_error < 2e-3 and euler_error > 50 * heun_error  # second against first order
    with pytest.raises(ValueError, match="sampler"):
        rf.reflow_pairs(constant, z, times(2), "rk4")


def test_one_step_sample_is_z_minus_v():
    cfg = rf.Config(dataset="two-moons", hidden=16)
    data = loop.load_data(cfg)
    net = loop.build_model(cfg, data).eval()
    options = configs.SampleConfig().resolve(cfg, data)
    draw = rf.draw_flow(cfg, data, net, 10, 3, options, progress=False)
    z = torch.randn((10, 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = z - net(z, torch.ones(10))
    assert torch.allclose(draw.x_one, want, atol=1e-6)
    assert not torch.allclose(draw.x, want, atol=1e-3)  # the 18-step sample is another point


# --- straightness ------------------------------------------------------------------------------

def test_path_straightness_by_hand():
    ts = torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64)
    x_start = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    x_end = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 1.0]], [[3.0, -1.0]]], dtype=torch.float64)
    chord = torch.tensor([2.0, -1.0], dtype=torch.float64)  # (x_start - x_end) / 1
    want = 0.25 * (chord - v[0, 0]).pow(2).sum() + 0.75 * (chord - v[1, 0]).pow(2).sum()
    assert rf.path_straightness(ts, v, x_start, x_end).item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="decreasing"):
        rf.path_straightness(ts.flip(0), v, x_start, x_end)
    with pytest.raises(ValueError, match="velocities of shape"):
        rf.path_straightness(ts, v[:1], x_start, x_end)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_straightness_zero_for_constant_positive_for_curved(sampler):
    z = torch.randn(256, 3, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    constant = lambda x, t: c.expand_as(x)  # noqa: E731
    assert rf.straightness(constant, z, times(10), sampler).item() == pytest.approx(0, abs=1e-12)
    # A straight path at a varying speed is not straight in S's sense either.
    accelerating = lambda x, t: c.expand_as(x) * 2 * t  # noqa: E731
    assert rf.straightness(accelerating, z, times(10), sampler).item() > 0.1
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    curved = lambda x, t: x @ rotation.T  # noqa: E731
    assert rf.straightness(curved, z, times(10), sampler).item() > 0.1


def test_straightness_of_euler_path_is_the_variance_of_its_velocities():
    z = torch.randn(64, 2, dtype=torch.float64)
    field = lambda x, t: torch.sin(3 * x + t)  # noqa: E731
    ts = times(8)
    v, x = [], z
    for i in range(8):
        v.append(field(x, float(ts[i])))
        x = x + float(ts[i + 1] - ts[i]) * v[-1]
    v = torch.stack(v)
    mean = v.mean(0)  # uniform steps: the chord's velocity is the plain mean
    want = (v - mean).pow(2).sum(-1).mean()
    assert rf.straightness(field, z, ts, "euler").item() == pytest.approx(want.item(), rel=1e-10)


def test_straightness_of_gaussian_rectified_flow_matches_closed_form():
    """S = (2 - pi / 2) s per dimension for data N(m, s^2) (module docstring), independent of
    m; the left Riemann sum converges to it at first order in the step."""
    m, s = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 2.0],
                                                                        dtype=torch.float64)
    z = unit_normal_grid(2000, 2)
    want = (2 - math.pi / 2) * s.sum().item()
    errors = [abs(rf.straightness(gaussian_velocity(m, s), z, times(n)).item() / want - 1)
              for n in (200, 400)]
    assert errors[1] < 0.005 and errors[1] < 0.6 * errors[0], errors
    # Data equal to the noise (m = 0, s = 1) still gives a curved 1-RF (Z_0 = Z_1, speed != 0).
    unit = rf.straightness(gaussian_velocity(torch.zeros(2), torch.ones(2)), z, times(400))
    assert unit.item() == pytest.approx(2 * (2 - math.pi / 2), rel=0.01)


# --- config and the stage boundary ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"reflow_after": 0}, "reflow-after must be at least 1"),
    ({"steps": 10, "reflow_after": 11}, "exceeds --steps"),
    ({"reflow_pairs": 100, "batch_size": 128}, "reflow-pairs 100 must be at least"),
    ({"reflow_ode_steps": 0}, "reflow-ode-steps"),
    ({"reflow_sampler": "ddim"}, "reflow-sampler"),
    ({"conditional": True}, "conditional"),
    ({"classifier_steps": 10}, "classifier-steps"),
    ({"sampler": "ddpm"}, "does not apply"),
])
def test_bad_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rf.Config(**{"steps": 3000, **kwargs})


def test_every_field_has_its_flag_text():
    docs = field_docs(rf.Config)
    assert {f.name for f in dataclasses.fields(rf.Config)} == set(docs)
    assert docs["steps"].startswith("Optimisation steps of both stages")
    assert rf.Config.METHOD == "rectified_flow"
    assert rf.Config.__bases__ == (configs.DiffusionConfig,)
    # Flat, yet every flag of flow matching with its default and text: stage 1 is flow matching.
    fm_fields = {f.name: f.default for f in dataclasses.fields(flow_matching.Config)}
    assert {n: d for n, d in fm_fields.items() if n != "steps"} == {
        f.name: f.default for f in dataclasses.fields(rf.Config) if f.name in fm_fields
        and f.name != "steps"}
    fm_docs = field_docs(flow_matching.Config)
    assert all(docs[n] == fm_docs[n] for n in fm_fields if n != "steps")


TINY = dict(dataset="8gaussians", hidden=32, batch_size=64, reflow_pairs=256,
            reflow_ode_steps=4, log_every=5, ckpt_every=1000, eval_samples=0, warmup_steps=5)


def checkpoint(run: Run) -> dict[str, torch.Tensor]:
    return load_tensors(run.path("checkpoint.safetensors"))


def test_first_stage_is_flow_matching_step_for_step(runs):
    cfg = rf.Config(**TINY, steps=20, reflow_after=20)
    fm_cfg = flow_matching.Config(**{f.name: getattr(cfg, f.name)
                                     for f in dataclasses.fields(flow_matching.Config)})
    ours = rf.train(cfg, Run.create("rectified_flow", cfg, root=runs), progress=False)
    theirs = loop.train(fm_cfg, Run.create("flow_matching", fm_cfg, root=runs),
                             progress=False)
    a, b = checkpoint(ours), checkpoint(theirs)
    for name in b:
        if name.startswith(("model.", "ema.")):
            assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in ours.metrics] == [r["loss"] for r in theirs.metrics]


def test_resume_across_the_reflow_boundary_is_exact(runs):
    """Stopped at the boundary (pairs not made yet), then inside the reflow (pairs restored from
    the checkpoint), then run to the end: bitwise the uninterrupted run."""
    cfg = rf.Config(**TINY, steps=40, reflow_after=20)
    whole = rf.train(cfg, Run.create("rectified_flow", cfg, root=runs), progress=False)
    run = Run.create("rectified_flow", cfg, root=runs)
    for steps, flows in ((20, ["rf1"]), (25, ["rf1", "rf2"]), (40, ["rf1", "rf2"])):
        rf.train(dataclasses.replace(cfg, steps=steps), run, progress=False)
        assert list(rf.load_flows(run)[2]) == flows
    a, b = checkpoint(whole), checkpoint(run)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert drop(whole.metrics) == drop(Run.open(run.dir).metrics)
    # The pairs are the 1-RF's: its Euler-4 images of the stored z, not the data nor zeros.
    assert not torch.equal(a["pairs.x0"], a["pairs.z"]) and a["pairs.x0"].abs().sum() > 0
    _, data, flows = rf.load_flows(whole)
    with torch.no_grad():
        again = rf.reflow_pairs(cfg.formulation().velocity(flows["rf1"]), a["pairs.z"],
                                times(4), "heun")
    assert torch.allclose(again, a["pairs.x0"], atol=1e-5)
    assert not torch.equal(a["ema_rf1.net.0.weight"], a["ema.net.0.weight"])


# --- behaviour ---------------------------------------------------------------------------------

def one_step_mmds(run: Run, n: int = 500) -> dict[str, tuple[float, float, float]]:
    """(one-step MMD, Heun-18 MMD, straightness) of each flow of the run."""
    cfg, data, flows = rf.load_flows(run)
    options = configs.SampleConfig().resolve(cfg, data)
    out = {}
    for name, net in flows.items():
        d = rf.draw_flow(cfg, data, net, n, 0, options, progress=False)
        ref = data.x_test[:1000]
        out[name] = (mmd_rbf(d.x_one, ref), mmd_rbf(d.x, ref), d.straightness)
    return out


def test_reflow_makes_one_step_good_on_8gaussians(runs):
    """400 steps of 1-RF, 300 of reflow on 1,000 pairs. Measured (seeds 0-3, MMD to 1,000 test
    points): one-step MMD 0.88-0.95 -> 0.13-0.15, straightness 1.35-1.41 -> 0.002-0.003, Heun-18
    MMD 0.12-0.13 before and after."""
    cfg = rf.Config(dataset="8gaussians", steps=700, reflow_after=400, reflow_pairs=1000,
                    reflow_ode_steps=16, eval_samples=0, ckpt_every=10_000)
    run = rf.train(cfg, Run.create("rectified_flow", cfg, root=runs), progress=False)
    got = one_step_mmds(run)
    (one1, heun1, s1), (one2, heun2, s2) = got["rf1"], got["rf2"]
    assert one2 < 0.3 * one1 and s2 < 0.05 * s1, got
    assert one2 < 1.5 * heun1 + 0.02, got  # one step of 2-RF: about 18 Heun steps of 1-RF
    assert heun2 < 1.5 * heun1 + 0.02, got  # the reflow keeps the distribution


@pytest.mark.slow
def test_reflow_one_step_matches_the_multi_step_sampler(runs):
    """Longer (about 15 s of CPU): 1,500 + 1,500 steps on 4,000 pairs made by Heun-32.
    Measured (seeds 0, 1; n = 1,000): one-step MMD 2.75 -> 0.023-0.024 against Heun-18's
    0.017 for the 1-RF, straightness 1.85-1.89 -> 0.003."""
    cfg = rf.Config(dataset="8gaussians", steps=3000, reflow_after=1500, reflow_pairs=4000,
                    eval_samples=0)
    run = rf.train(cfg, Run.create("rectified_flow", cfg, root=runs), progress=False)
    got = one_step_mmds(run, n=1000)
    (one1, heun1, s1), (one2, _, s2) = got["rf1"], got["rf2"]
    assert one2 < 0.02 * one1 and one2 < 2 * heun1 and s2 < 0.005 * s1, got


def test_evaluate_scores_both_flows_and_draws_the_figures(runs):
    cfg = rf.Config(**{**TINY, "eval_samples": 50}, steps=12, reflow_after=6)
    run = rf.train(cfg, Run.create("rectified_flow", cfg, root=runs), progress=False)
    metrics = {k.removeprefix("eval/"): v for k, v in run.summary().items()
               if k.startswith("eval/")}
    for prefix in ("", "rf1_"):
        for key in ("mmd", "one_step_mmd", "straightness", "test_nll_nats", "test_nll_nfe"):
            assert math.isfinite(metrics[prefix + key]), prefix + key
        assert metrics[prefix + "test_nll_rtol"] == metrics[prefix + "test_nll_atol"] == 1e-5
    assert metrics["function_evaluations"] == 35
    for name in ("samples.png", "trajectory.png", "reflow.png", "vector_field.png", "loss.png"):
        assert run.path(name).is_file(), name
    assert rf.sample(run, 5).shape == (5, 2)
    for fn in (rf.evaluate, rf.sample):
        with pytest.raises(ConfigError, match="churn"):
            fn(run, 10, options=configs.SampleConfig(churn=1.0))


def test_evaluate_on_images(runs, tmp_path):
    """Images of the user's own (no shipped classifier: the metrics carry a note)."""
    import numpy as np

    path = str(tmp_path / "faces.npy")
    np.save(path, np.random.default_rng(0).random((40, 1, 4, 4)).astype("float32"))
    cfg = rf.Config(dataset=path, steps=4, reflow_after=2, channels=8, batch_size=8,
                    reflow_pairs=16, reflow_ode_steps=2, eval_samples=0)
    run = rf.train(cfg, Run.create("rectified_flow", cfg, root=runs), progress=False)
    metrics = rf.evaluate(run, 20, options=configs.SampleConfig(steps=3), progress=False)
    assert "note" in metrics and metrics["sampler_steps"] == 3
    assert metrics["straightness"] >= 0 and metrics["rf1_straightness"] >= 0
    assert run.path("reflow.png").is_file() and rf.sample(run, 3).shape == (3, 1, 4, 4)
