"""Every diffusion and flow-matching model learns: short runs on 2D toys (MMD to held-out data),
class-conditional runs with guidance, the sampling flags of the CLI, and (slow) the classifier
Frechet distance on the digits and MNIST."""

import json

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.config import BatchConfig, ConfigError
from mlatlas.core.run import Run
from mlatlas.data import load_dataset
from mlatlas.eval.metrics import mmd_rbf
from mlatlas.generative.diffusion import configs, formulations, loop
from mlatlas.generative.diffusion.configs import SampleConfig
from mlatlas.generative.flow_matching import flow_matching, rectified_flow
from mlatlas.registry import get_method

# (config, overrides, how many times lower the MMD must end than an untrained network's). VE's
# network sees inputs of scale sigma up to 100 unscaled (c_in = 1 in Karras et al.'s Table 1),
# which a small MLP learns slowest: at 600 steps it gains 2.8x where EDM gains over 10x.
CONFIGS = {
    "vp-eps": (configs.VPConfig, {"prediction": "eps"}, 5),
    "vp-v-cosine": (configs.VPConfig, {"prediction": "v", "schedule": "cosine"}, 5),
    "vp-x0": (configs.VPConfig, {"prediction": "x0"}, 5),
    "ve": (configs.VEConfig, {}, 2),
    "edm": (configs.EDMConfig, {}, 5),
    "flow_matching": (flow_matching.Config, {}, 5),
}


def trained(cls, runs, steps, **kw):
    cfg = cls(dataset="8gaussians", steps=steps, batch_size=256, eval_samples=0, **kw)
    return loop.train(cfg, Run.create(cfg.METHOD, cfg, root=runs), progress=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_learns_a_2d_toy(name, runs):
    """MMD of 500 samples to the held-out points falls well below an untrained network's."""
    cls, kw, factor = CONFIGS[name]
    test_points = load_dataset("8gaussians").x_test
    before = mmd_rbf(loop.sample(trained(cls, runs, 1, lr=1e-12, **kw), 500), test_points)
    after = mmd_rbf(loop.sample(trained(cls, runs, 600, **kw), 500), test_points)
    assert after < before / factor, (before, after)


@pytest.mark.parametrize("name", ["edm", "flow_matching", "vp-eps"])
def test_likelihood_of_held_out_points_rises(name, runs):
    """The probability-flow ODE's exact log-likelihood of 300 test points: a trained model's
    beats an untrained one's by over a nat per point. A tolerance of 1e-3 suffices for a margin
    of a nat (on 500 points it was within 2e-3 nats of the converged mean, docs/methods/
    diffusion.md) and takes a quarter of the default's evaluations."""
    cls, kw, _ = CONFIGS[name]
    x = load_dataset("8gaussians").x_test[:300]
    nll = []
    for steps, lr in ((1, 1e-12), (600, 1e-3)):
        cfg, _, model = loop.load_model(trained(cls, runs, steps, lr=lr, **kw))
        likelihood = formulations.log_likelihood(cfg.formulation(), model, x, rtol=1e-3,
                                                 atol=1e-3)
        nll.append(-likelihood.log_p.mean().item())
    assert nll[1] < nll[0] - 1, nll


def test_every_sampler_applies_to_a_vp_run(runs):
    run = trained(configs.VPConfig, runs, 400)
    test_points = load_dataset("8gaussians").x_test
    scores = {}
    for sampler, steps, extra in [("ddpm", 1000, {}), ("ddim", 50, {"eta": 0.5}),
                                  ("euler", 50, {"churn": 5})]:
        options = SampleConfig(sampler=sampler, steps=steps, **extra)
        scores[sampler] = mmd_rbf(loop.sample(run, 400, options=options), test_points)
    metrics = loop.evaluate(run, n=400, options=SampleConfig(sampler="heun", steps=18))
    assert metrics["sampler"] == "heun" and metrics["function_evaluations"] == 35
    scores["heun"] = metrics["mmd"]
    assert max(scores.values()) < 0.3, scores
    # The true density is known: 8 Gaussians of std 0.5 / sqrt 2 on a circle of radius 4 / sqrt 2.
    angles = torch.arange(8) * torch.pi / 4
    centres = 4 / 2**0.5 * torch.stack([angles.cos(), angles.sin()], 1)
    x, var = load_dataset("8gaussians").x_test[:500].double(), 0.125
    log_p = torch.logsumexp(-(x[:, None] - centres).pow(2).sum(2) / (2 * var), 1) \
        - torch.log(torch.tensor(8 * 2 * torch.pi * var))
    true_nll = -log_p.mean().item()
    # 400 steps measured 4.06 nats against the true 2.89 (an untrained network: 12.0).
    assert true_nll - 0.1 < metrics["test_nll_nats"] < true_nll + 1.5, (metrics["test_nll_nats"],
                                                                         true_nll)
    assert metrics["test_nll_rtol"] == metrics["test_nll_atol"] == 1e-5
    assert metrics["test_nll_nfe"] > 100
    summary = run.summary()
    assert summary["eval/test_nll_nfe"] == metrics["test_nll_nfe"]
    for name in ("samples.png", "trajectory.png", "vector_field.png", "loss.png"):
        assert (run.dir / name).is_file()


def test_sampling_options_are_checked(runs):
    run = trained(configs.EDMConfig, runs, 2)
    cfg, data = loop.load_config(run), loop.load_data(loop.load_config(run))
    for options, message in [(SampleConfig(sampler="ddpm"), "does not apply to edm"),
                             (SampleConfig(eta=0.5), "ddim sampler only"),
                             (SampleConfig(guidance=2), "trained with --conditional")]:
        with pytest.raises(ConfigError, match=message):
            options.resolve(cfg, data)
    with pytest.raises(ConfigError, match=r"--steps must be in 0\.\.2\^63-1, got -3"):
        SampleConfig(steps=-3)  # refused when made, before any run is read
    with pytest.raises(ConfigError, match="does not apply"):
        configs.EDMConfig(sampler="ddpm")
    with pytest.raises(ConfigError, match="class labels"):
        loop.load_data(configs.EDMConfig(dataset="8gaussians", conditional=True))


FAMILY = {"ddpm": configs.DDPMConfig, "vp": configs.VPConfig, "ve": configs.VEConfig,
          "edm": configs.EDMConfig, "flow_matching": flow_matching.Config,
          "rectified_flow": rectified_flow.Config}


@pytest.mark.parametrize("method", FAMILY)
def test_configs_follow_the_family_contract(method):
    """METHOD names the method; one family base between the config and BatchConfig; checks in
    check(), not in __post_init__ overrides; choices are Literal and BaseConfig rejects others."""
    cls = FAMILY[method]
    assert method == cls.METHOD and get_method(method).config_cls is cls
    assert cls.__bases__ == (configs.DiffusionConfig,)
    assert configs.DiffusionConfig.__bases__ == (BatchConfig,)
    assert "__post_init__" not in cls.__dict__ and "__post_init__" not in vars(
        configs.DiffusionConfig)
    with pytest.raises(ConfigError, match="--sampler must be one of"):
        cls(sampler="hune")


def test_ddpm_variance_reaches_its_sampler():
    """--variance beta gives DDPM's ancestral sampler the forward variance."""
    beta = configs.DDPMConfig(T=20, variance="beta").formulation()
    posterior = configs.DDPMConfig(T=20).formulation()
    assert beta.sampler_options("ddpm") == {"variance": "beta"}
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    draws = {}
    for name, formulation, options in (("beta", beta, {}), ("posterior", posterior, {}),
                                       ("given", posterior, {"variance": "beta"})):
        draws[name] = formulation.sample(net, (64, 2), "ddpm", 20, torch.Generator().manual_seed(0),
                                         torch.device("cpu"), **options)
    assert torch.equal(draws["beta"], draws["given"])
    assert not torch.allclose(draws["beta"], draws["posterior"])


def test_evaluate_draws_n_samples_from_its_seed(runs):
    """n = None takes the run's eval_samples; the same seed gives the same numbers, another seed
    another draw; summary.json holds train/ and flat eval/ keys."""
    cfg = configs.EDMConfig(dataset="8gaussians", steps=3, batch_size=64, hidden=16,
                            eval_samples=30, sample_steps=3)
    run = loop.train(cfg, Run.create("edm", cfg, root=runs), progress=False)
    summary = run.summary()
    assert summary["train/steps"] == 3 and summary["eval/n_samples"] == 30
    assert summary["train/loss"] == run.metrics[-1]["loss"] and "eval" not in summary
    assert all(k.startswith(("train/", "eval/")) for k in summary)
    again = loop.evaluate(run)
    assert again["n_samples"] == 30 and again["mmd"] == summary["eval/mmd"]
    other = loop.evaluate(run, n=40, seed=1)
    assert other["n_samples"] == 40 and other["mmd"] != again["mmd"]
    assert run.summary()["eval/mmd"] == other["mmd"]
    assert torch.equal(loop.sample(run, 5, seed=2), loop.sample(run, 5, seed=2))
    assert not torch.equal(loop.sample(run, 5, seed=2), loop.sample(run, 5, seed=3))


def test_conditional_digits_with_guidance(runs):
    """A class-conditional run samples the requested digit; guidance and labels reach the
    network (the outputs change with them) and the run reports label accuracy."""
    cfg = configs.EDMConfig(dataset="digits", conditional=True, steps=3, batch_size=16,
                              channels=8, eval_samples=0)
    run = loop.train(cfg, Run.create("edm", cfg, root=runs), progress=False)
    base = loop.sample(run, 4, options=SampleConfig(steps=3, label=7))
    guided = loop.sample(run, 4, options=SampleConfig(steps=3, label=7, guidance=3))
    other = loop.sample(run, 4, options=SampleConfig(steps=3, label=2))
    assert base.shape == (4, 1, 8, 8) and not torch.allclose(base, guided)
    assert not torch.allclose(base, other)
    metrics = loop.evaluate(run, n=20, options=SampleConfig(steps=3))
    assert 0 <= metrics["label_accuracy"] <= 1
    with pytest.raises(ConfigError, match="--label must be"):
        SampleConfig(label=10).resolve(cfg, loop.load_data(cfg))


FAST = ["--dataset", "8gaussians", "--batch-size", "64", "--hidden", "32", "--eval-samples", "50",
        "--no-progress"]


def test_cli_sampling_flags(runs, capsys):
    assert main(["train", "edm", "--steps", "20", "--out", str(runs), *FAST]) == 0
    (path,) = runs.iterdir()
    assert json.loads((path / "summary.json").read_text())["eval/function_evaluations"] == 35
    assert main(["sample", str(path), "--n", "8", "--sampler", "euler", "--steps", "7",
                 "--no-progress"]) == 0
    assert (path / "samples-n8-seed0-sampler-euler-steps-7.npy").is_file()
    capsys.readouterr()
    assert main(["eval", str(path), "--n", "40", "--sampler", "heun", "--steps", "4",
                 "--churn", "10", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["function_evaluations"] == 7
    for argv, message in [(["--sampler", "ddpm"], "does not apply to edm"),
                          (["--guidance", "3"], "trained with --conditional"),
                          (["--sampler", "hune"], "")]:
        assert main(["sample", str(path), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# --- slow: image quality -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cls,kw,limit", [
    (configs.EDMConfig, {}, 20.0),
    (configs.VPConfig, {}, 25.0),
    (flow_matching.Config, {}, 20.0),
])
def test_digits_frechet_distance(cls, kw, limit, runs):
    """2,000 steps on the 8x8 digits: the classifier Frechet distance of 500 samples to the
    test split (500 real training digits score 10.7; an untrained network about 650)."""
    cfg = cls(dataset="digits", **kw)
    run = loop.train(cfg, Run.create(cfg.METHOD, cfg, root=runs), progress=False)
    assert run.summary()["eval/frechet_distance"] < limit


@pytest.mark.slow
def test_mnist_frechet_distance(runs):
    """EDM on 28x28 MNIST, a short CPU budget: far better than untrained by the Frechet distance
    on the shipped MNIST classifier's features."""
    common = dict(dataset="mnist", batch_size=64, channels=16, eval_samples=200, sample_steps=10)
    untrained = configs.EDMConfig(steps=1, lr=1e-12, **common)
    before = loop.train(untrained, Run.create("edm", untrained, root=runs), progress=False)
    cfg = configs.EDMConfig(steps=1500, **common)
    run = loop.train(cfg, Run.create("edm", cfg, root=runs), progress=False)
    fd_before = before.summary()["eval/frechet_distance"]
    fd_after = run.summary()["eval/frechet_distance"]
    assert fd_after < fd_before / 4, (fd_before, fd_after)


def test_classifier_guidance_wiring(runs):
    """--classifier-steps trains the noisy classifier into the run folder; --classifier-scale
    guides sampling with it (and names the label), on an unconditional run."""
    cfg = configs.EDMConfig(dataset="digits", steps=2, batch_size=16, channels=8,
                              classifier_steps=3, eval_samples=0)
    run = loop.train(cfg, Run.create("edm", cfg, root=runs), progress=False)
    assert run.path(loop.CLASSIFIER).is_file()
    plain = loop.sample(run, 4, options=SampleConfig(steps=3))
    guided = loop.sample(run, 4, options=SampleConfig(steps=3, classifier_scale=5, label=3))
    assert guided.shape == plain.shape and not torch.allclose(plain, guided)
    metrics = loop.evaluate(run, n=20, options=SampleConfig(steps=3, classifier_scale=2))
    assert metrics["classifier_scale"] == 2 and "label_accuracy" in metrics
    bare = configs.EDMConfig(dataset="digits", steps=1, batch_size=16, channels=8,
                               eval_samples=0)
    with pytest.raises(ConfigError, match="--classifier-steps"):
        SampleConfig(classifier_scale=1).resolve(bare, loop.load_data(bare))
    with pytest.raises(ConfigError, match="--label needs"):
        SampleConfig(label=1).resolve(bare, loop.load_data(bare))
