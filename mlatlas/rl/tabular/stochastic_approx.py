"""Stochastic approximation: Robbins-Monro, mean estimation, SGD / BGD / MBGD (Zhao, Chapter 6).

Robbins-Monro (eq. 6.5). To solve g(w) = 0 when only noisy observations
g~(w, eta) = g(w) + eta can be made,

    w_{k+1} = w_k - a_k g~(w_k, eta_k),   k = 1, 2, 3, ...

Theorem 6.1: w_k -> w* (g(w*) = 0) almost surely if (a) 0 < c1 <= grad_w g(w) <= c2,
(b) sum_k a_k = inf and sum_k a_k^2 < inf, (c) E[eta_k | H_k] = 0 and E[eta_k^2 | H_k] < inf.
For a_k = c / k^p condition (b) holds exactly when 1/2 < p <= 1. A constant a_k (p = 0) breaks
sum a_k^2 < inf: w_k keeps fluctuating around w*. a_k = 1/k^2 breaks sum a_k = inf: w_k can move
at most sum_k a_k |g~| from w_1 (eq. 6.6) and stalls before the root when w_1 is far from it.

Mean estimation (eqs. 6.2-6.4). w_{k+1} = w_k - alpha_k (w_k - x_k) for i.i.d. samples x_k of X.
With alpha_k = 1/k it is the running sample mean exactly, w_{k+1} = (1/k) sum_{i<=k} x_i
(eq. 6.3). It is the RM algorithm for g(w) = w - E[X] with eta = E[X] - x (Section 6.2.2) and
SGD on f(w, X) = ||w - X||^2 / 2 (Section 6.4.1).

BGD, MBGD and SGD (Section 6.4.4) on min_w J(w) = 1/(2n) sum_i ||w - x_i||^2, whose minimiser is
w* = x_bar, the mean of the n samples; grad_w f(w, x) = w - x:

    BGD:   w_{k+1} = w_k - alpha_k (1/n) sum_{i=1}^n (w_k - x_i)  = w_k - alpha_k (w_k - x_bar)
    MBGD:  w_{k+1} = w_k - alpha_k (1/m) sum_{j in I_k} (w_k - x_j) = w_k - alpha_k (w_k - x_bar_k)
    SGD:   w_{k+1} = w_k - alpha_k (w_k - x_k)

where I_k (|I_k| = m) and x_k are drawn uniformly from the samples and x_bar_k (the book's
x_bar_k^(m)) is the mean of the mini-batch. With alpha_k = 1/k: BGD gives w_{k+1} = x_bar at once,
MBGD w_{k+1} = (1/k) sum_{j<=k} x_bar_j, SGD w_{k+1} = (1/k) sum_{j<=k} x_j. Figure 6.5: X
uniform in the square of side 20 centred at the origin, n = 100 samples, m = 1, 5, 50.

Every method vectorizes over ``runs`` independent runs (one row each), so a run reports the mean
and spread of the error at every k, not one noisy path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mlatlas.core.config import BaseConfig, ConfigError
from mlatlas.core.optim import inverse_power
from mlatlas.core.plots import plt
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import seed_everything

# Runs whose whole path w_1, w_2, ... is kept for the figures.
TRACE_RUNS = 5

# Root-finding problems g(w) = 0 for the RM algorithm: (g, root, description).
PROBLEMS = {
    "tanh": (lambda w: torch.tanh(w - 1.0), 1.0, "g(w) = tanh(w - 1)"),
    "cubic": (lambda w: w**3 - 5.0, 5.0 ** (1.0 / 3.0), "g(w) = w^3 - 5"),
}


def satisfies_theorem_6_1(power: float) -> bool:
    """Condition (b) of Theorem 6.1 for a_k = c / k^p: sum a_k = inf iff p <= 1, and
    sum a_k^2 < inf iff p > 1/2."""
    return 0.5 < power <= 1.0


def robbins_monro_step(w: torch.Tensor, g_tilde: torch.Tensor, a: float) -> torch.Tensor:
    """w_{k+1} = w_k - a_k g~(w_k, eta_k) (eq. 6.5)."""
    return w - a * g_tilde


def mean_estimation_step(w: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_{k+1} = w_k - alpha_k (w_k - x_k) (eq. 6.4)."""
    return w - alpha * (w - x)


def mean_estimation(x: torch.Tensor, alpha: Callable[[int], float] | None = None,
                    w1: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Run eq. 6.4 over samples x (K, ...): returns w_2 .. w_{K+1} (K, ...).

    ``alpha`` maps k to alpha_k (default 1/k, which gives the running sample mean, eq. 6.3).
    """
    alpha = alpha or (lambda k: 1.0 / k)
    w = torch.as_tensor(w1, dtype=x.dtype).expand_as(x[0]).clone()
    out = torch.empty_like(x)
    for k in range(1, x.shape[0] + 1):
        w = mean_estimation_step(w, x[k - 1], alpha(k))
        out[k - 1] = w
    return out


def squared_error_gradient(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_w f(w, x) = w - x for f(w, x) = ||w - x||^2 / 2 (Section 6.4.1)."""
    return w - x


def bgd_step(w: torch.Tensor, samples: torch.Tensor, alpha: float) -> torch.Tensor:
    """BGD: w (R, d), samples (R, n, d); the gradient averaged over all n samples."""
    return w - alpha * squared_error_gradient(w[:, None], samples).mean(dim=1)


def mbgd_step(w: torch.Tensor, samples: torch.Tensor, index: torch.Tensor,
              alpha: float) -> torch.Tensor:
    """MBGD: the gradient averaged over the mini-batch I_k = index (R, m) of each run."""
    batch = samples.gather(1, index[..., None].expand(-1, -1, samples.shape[2]))
    return bgd_step(w, batch, alpha)


def sgd_step(w: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """SGD: w_{k+1} = w_k - alpha_k grad_w f(w_k, x_k) (eq. 6.13); x (R, d)."""
    return w - alpha * squared_error_gradient(w, x)


def sample_batch_indices(runs: int, n: int, m: int, generator: torch.Generator,
                         replace: bool = True) -> torch.Tensor:
    """I_k for every run, (R, m): i.i.d. uniform draws from {0..n-1}, or m distinct ones."""
    if replace:
        return torch.randint(n, (runs, m), generator=generator)
    return torch.rand(runs, n, generator=generator).argsort(dim=1)[:, :m]


# Command-line methods ------------------------------------------------------------------------


@dataclass
class StepSizeConfig(BaseConfig):
    """Fields shared by the three methods: the step sizes and the number of runs."""

    step_scale: float = 1.0
    """c in a_k = c / k^p."""
    step_power: float = 1.0
    """p in a_k = c / k^p: Theorem 6.1 needs 1/2 < p <= 1; 0 is a constant step, 2 decays too
    fast."""
    runs: int = 1000
    """Independent runs done side by side; the summary gives the mean and spread over them."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""

    def check(self) -> None:
        super().check()
        if self.step_scale <= 0:
            raise ConfigError(f"--step-scale must be positive, got {self.step_scale}")
        if self.step_power < 0:
            raise ConfigError(f"--step-power must be at least 0, got {self.step_power}")
        if self.runs < 1:
            raise ConfigError(f"--runs must be at least 1, got {self.runs}")

    def a(self, k: int) -> float:
        return inverse_power(self.step_scale, k, self.step_power)


@dataclass
class RobbinsMonroConfig(StepSizeConfig):
    METHOD: ClassVar[str] = "robbins_monro"

    problem: Literal["tanh", "cubic"] = "tanh"
    """g(w): 'tanh' is tanh(w - 1) with root 1 (Figure 6.4); 'cubic' is w^3 - 5 with root 5^(1/3)
    (Figure 6.3; its derivative is unbounded, so condition (a) of Theorem 6.1 fails and w_1 and
    the steps must be chosen with care)."""
    w1: float = 3.0
    """Initial guess w_1 (Figure 6.4 starts at 3)."""
    noise_std: float = 1.0
    """Standard deviation of the Gaussian observation noise eta_k (0: noiseless, as Figure 6.4)."""
    steps: int = 10_000
    """Iterations k = 1..steps."""
    log_every: int = 100
    """Write a row of metrics.csv every this many iterations."""
    ckpt_every: int = 2000
    """Write checkpoint.safetensors every this many iterations (and always at the end)."""

    def check(self) -> None:
        super().check()
        if self.noise_std < 0:
            raise ConfigError(f"--noise-std must be at least 0, got {self.noise_std}")


@dataclass
class MeanEstimationConfig(StepSizeConfig):
    METHOD: ClassVar[str] = "mean_estimation"

    distribution: Literal["uniform", "normal"] = "uniform"
    """Distribution of X: uniform or normal with the mean and standard deviation below."""
    mean: float = 5.0
    """E[X], the value to estimate."""
    std: float = 2.0
    """Standard deviation of X."""
    w1: float = 0.0
    """Initial estimate w_1 (with alpha_1 = 1 it is forgotten at once: w_2 = x_1)."""
    steps: int = 1000
    """Samples x_1..x_steps, one per iteration."""
    log_every: int = 10
    """Write a row of metrics.csv every this many iterations."""

    def check(self) -> None:
        super().check()
        if self.std < 0:
            raise ConfigError(f"--std must be at least 0, got {self.std}")


@dataclass
class SGDComparisonConfig(StepSizeConfig):
    METHOD: ClassVar[str] = "sgd_comparison"

    n_samples: int = 100
    """n, the size of the sample set {x_i} (Figure 6.5: 100)."""
    side: float = 20.0
    """X is uniform in the square of this side centred at the origin (Figure 6.5: 20)."""
    batch_sizes: str = "1,5,50"
    """Mini-batch sizes m to compare, comma separated (m = 1 is SGD); BGD always runs too."""
    replace: bool = True
    """Draw mini-batches with replacement (i.i.d. as in the book); without, m = n is BGD."""
    w1_x: float = -20.0
    """First coordinate of the initial guess w_1."""
    w1_y: float = 20.0
    """Second coordinate of the initial guess w_1."""
    runs: int = 500
    """Independent runs (each with its own n samples) done side by side."""
    steps: int = 30
    """Iterations k = 1..steps (Figure 6.5 shows 30)."""
    log_every: int = 1
    """Write a row of metrics.csv every this many iterations."""

    def check(self) -> None:
        super().check()
        if self.n_samples < 1:
            raise ConfigError(f"--n-samples must be at least 1, got {self.n_samples}")
        if self.side <= 0:
            raise ConfigError(f"--side must be positive, got {self.side}")
        sizes = self.sizes()
        if any(m > self.n_samples for m in sizes) and not self.replace:
            raise ConfigError(f"--batch-sizes {self.batch_sizes}: without replacement a batch "
                              f"cannot exceed --n-samples {self.n_samples}")

    def sizes(self) -> list[int]:
        try:
            sizes = [int(m) for m in self.batch_sizes.split(",") if m.strip()]
        except ValueError:
            sizes = []
        if not sizes or any(m < 1 for m in sizes) or len(set(sizes)) != len(sizes):
            raise ConfigError(f"--batch-sizes must be distinct positive integers separated by "
                              f"commas, "
                              f"got {self.batch_sizes!r}")
        return sizes


def _histories(steps: int, **columns: int) -> dict[str, torch.Tensor]:
    """Per-iteration records, checkpointed as the run's ``history`` group: row k holds the
    statistics of w_{k+1} (row 0 the initial guess), so the figures do not depend on
    log_every."""
    return {name: torch.full((steps + 1, width), math.nan, dtype=torch.float64)
            for name, width in columns.items()}


def _record(history: dict[str, torch.Tensor], name: str, k: int, value, steps: int) -> None:
    """history[name][k] = value; a run resumed with more steps than it was created with has its
    records extended to steps + 1 rows."""
    hist = history[name]
    if k >= hist.shape[0]:
        pad = torch.full((steps + 1 - hist.shape[0], *hist.shape[1:]), math.nan,
                         dtype=hist.dtype)
        hist = history[name] = torch.cat([hist, pad])
    hist[k] = value


def _error_stats(error: torch.Tensor) -> torch.Tensor:
    """Mean, 10% and 90% quantiles (nearest rank) of |w_k - w*| over runs."""
    ranked = error.sort().values
    last = ranked.shape[0] - 1
    return torch.stack([error.mean(), ranked[round(0.1 * last)], ranked[round(0.9 * last)]])


def _schedule(cfg: StepSizeConfig) -> str:
    """'1/k', '0.1', '2/k^0.75', ... for figure titles."""
    c, p = f"{cfg.step_scale:g}", cfg.step_power
    return c if p == 0 else f"{c}/k" if p == 1 else f"{c}/k^{p:g}"


def _error_figure(history: dict[str, torch.Tensor], target: float, target_label: str,
                  title: str, w_label: str, error_label: str):
    """w_k of a few runs (left) and the mean / 10-90% band of the error over runs (right)."""
    trace, stats = history["trace"], history["error"]
    k = torch.arange(1, trace.shape[0] + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(k, trace.numpy(), linewidth=1)
    left.axhline(target, color="black", linestyle="--", linewidth=1, label=target_label)
    left.legend(loc="best")
    left.set_xscale("log")
    left.set_xlabel("iteration k")
    left.set_ylabel(w_label)
    left.set_title(f"{trace.shape[1]} runs")
    right.plot(k, stats[:, 0].numpy(), label="mean over runs")
    right.fill_between(k.numpy(), stats[:, 1].numpy(), stats[:, 2].numpy(), alpha=0.3,
                       label="10-90% of runs")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("iteration k")
    right.set_ylabel(error_label)
    right.legend(loc="best")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    # Spacing set by hand: tight_layout doubles the (slow) text layout that savefig does anyway.
    fig.subplots_adjust(wspace=0.3, top=0.85)
    return fig


def train_robbins_monro(cfg: RobbinsMonroConfig, run: Run | None = None,
                        progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    g, root, description = PROBLEMS[cfg.problem]
    n_trace = min(TRACE_RUNS, cfg.runs)
    tables = {"w": torch.full((cfg.runs,), cfg.w1, dtype=torch.float64)}
    history = _histories(cfg.steps, trace=n_trace, error=3)
    history["trace"][0] = cfg.w1
    history["error"][0] = abs(cfg.w1 - root)

    def step(k: int) -> dict[str, float]:
        w = tables["w"]
        eta = cfg.noise_std * torch.randn(cfg.runs, generator=generator, dtype=torch.float64)
        w = robbins_monro_step(w, g(w) + eta, cfg.a(k))
        tables["w"] = w
        error = (w - root).abs()
        _record(history, "trace", k, w[:n_trace], cfg.steps)
        _record(history, "error", k, _error_stats(error), cfg.steps)
        return {"w_mean": w.mean(), "error_mean": error.mean(),
                "error_std": error.std(correction=0), "step_size": cfg.a(k)}

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "history": history, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    w = tables["w"]
    error = (w - root).abs()
    holds = satisfies_theorem_6_1(cfg.step_power)
    run.save_figure(_error_figure(
        history, root, f"root w* = {root:.4g}", f"Robbins-Monro on {description}, a_k = "
        f"{_schedule(cfg)}, noise std {cfg.noise_std:g}", "w_k", "|w_k - w*|"), "estimates.png")
    run.write_summary({
        "train/problem": description, "train/root": root, "eval/final_w_mean": w.mean().item(),
        "eval/final_error_mean": error.mean().item(),
        "eval/final_error_std": error.std(correction=0).item(),
        "eval/final_error_max": error.max().item(), "train/runs": cfg.runs,
        "train/iterations": cfg.steps, "train/step_size_conditions_hold": holds})
    return run


def _draw(cfg: MeanEstimationConfig, generator: torch.Generator) -> torch.Tensor:
    """One sample of X per run."""
    if cfg.distribution == "normal":
        return cfg.mean + cfg.std * torch.randn(cfg.runs, generator=generator,
                                                dtype=torch.float64)
    u = torch.rand(cfg.runs, generator=generator, dtype=torch.float64)
    return cfg.mean + cfg.std * math.sqrt(3.0) * (2.0 * u - 1.0)


def train_mean_estimation(cfg: MeanEstimationConfig, run: Run | None = None,
                          progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    n_trace = min(TRACE_RUNS, cfg.runs)
    tables = {"w": torch.full((cfg.runs,), cfg.w1, dtype=torch.float64)}
    samples = {"sum": torch.zeros(cfg.runs, dtype=torch.float64)}
    history = _histories(cfg.steps, trace=n_trace, error=3, sample_mean_error=1)
    history["trace"][0] = cfg.w1
    history["error"][0] = abs(cfg.w1 - cfg.mean)

    def step(k: int) -> dict[str, float]:
        x = _draw(cfg, generator)
        w = mean_estimation_step(tables["w"], x, cfg.a(k))
        tables["w"] = w
        # The sample mean (1/k) sum x_i, kept to show that alpha_k = 1/k reproduces it (eq. 6.3).
        samples["sum"] = samples["sum"] + x
        sample_mean = samples["sum"] / k
        error = (w - cfg.mean).abs()
        _record(history, "trace", k, w[:n_trace], cfg.steps)
        _record(history, "error", k, _error_stats(error), cfg.steps)
        _record(history, "sample_mean_error", k, (sample_mean - cfg.mean).abs().mean(),
                cfg.steps)
        return {"w_mean": w.mean(), "error_mean": error.mean(),
                "gap_to_sample_mean": (w - sample_mean).abs().max(), "step_size": cfg.a(k)}

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "samples": samples, "history": history, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    w = tables["w"]
    error = (w - cfg.mean).abs()
    fig = _error_figure(history, cfg.mean, "E[X]", f"Mean estimation, alpha_k = "
                        f"{_schedule(cfg)}, X {cfg.distribution} (mean {cfg.mean:g}, std "
                        f"{cfg.std:g})", "w_k", "|w_k - E[X]|")
    k = torch.arange(1, cfg.steps + 2)
    fig.axes[1].plot(k[1:], history["sample_mean_error"][1:, 0].numpy(), "k--",
                     linewidth=1, label="sample mean of k - 1 samples")
    fig.axes[1].legend(loc="best")
    run.save_figure(fig, "estimates.png")
    run.write_summary({
        "train/true_mean": cfg.mean, "eval/final_w_mean": w.mean().item(),
        "eval/final_error_mean": error.mean().item(),
        "eval/final_error_std": error.std(correction=0).item(),
        "eval/max_gap_to_sample_mean": (w - samples["sum"] / cfg.steps).abs().max().item(),
        "train/runs": cfg.runs, "train/iterations": cfg.steps,
        "train/step_size_conditions_hold": satisfies_theorem_6_1(cfg.step_power)})
    return run


def method_names(sizes: list[int]) -> list[str]:
    """Metric names of the compared algorithms: BGD first, then SGD (m = 1) and MBGD (m > 1)."""
    return ["bgd"] + ["sgd" if m == 1 else f"mbgd_{m}" for m in sizes]


def train_sgd_comparison(cfg: SGDComparisonConfig, run: Run | None = None,
                         progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    generator = seed_everything(cfg.seed)
    sizes = cfg.sizes()
    names = method_names(sizes)
    R, n = cfg.runs, cfg.n_samples
    # The sample sets {x_i} of every run, drawn once: the data the algorithms minimise J over.
    data = {"samples": cfg.side * (torch.rand(R, n, 2, generator=generator,
                                              dtype=torch.float64) - 0.5)}
    w1 = torch.tensor([cfg.w1_x, cfg.w1_y], dtype=torch.float64)
    tables = {"w": w1.expand(len(names), R, 2).clone()}
    history = {"distance": torch.full((cfg.steps + 1, len(names)), math.nan,
                                      dtype=torch.float64),
               "path": torch.full((cfg.steps + 1, len(names), 2), math.nan,
                                  dtype=torch.float64)}

    def distances() -> torch.Tensor:
        """||w_k - x_bar|| for every algorithm and run, (M, R)."""
        x_bar = data["samples"].mean(dim=1)
        return (tables["w"] - x_bar).norm(dim=2)

    history["distance"][0] = distances().mean(dim=1)
    history["path"][0] = tables["w"][:, 0]

    def step(k: int) -> dict[str, float]:
        x, w, alpha = data["samples"], tables["w"], cfg.a(k)
        w_next = torch.empty_like(w)
        w_next[0] = bgd_step(w[0], x, alpha)
        for i, m in enumerate(sizes, start=1):
            index = sample_batch_indices(R, n, m, generator, cfg.replace)
            if m == 1:
                w_next[i] = sgd_step(w[i], x[torch.arange(R), index[:, 0]], alpha)
            else:
                w_next[i] = mbgd_step(w[i], x, index, alpha)
        tables["w"] = w_next
        d = distances().mean(dim=1)
        _record(history, "distance", k, d, cfg.steps)
        _record(history, "path", k, w_next[:, 0], cfg.steps)
        return {f"distance_{name}": d[i] for i, name in enumerate(names)}

    fit(run, step, total_steps=cfg.steps,
        objects={"model": tables, "data": data, "history": history, "rng": generator},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    run.save_figure(comparison_figure(data["samples"], history, names, cfg), "comparison.png")
    final = distances()
    x_bar = data["samples"].mean(dim=1)
    # One flat key per compared algorithm (bgd, sgd, mbgd_5, ...).
    means, stds = final.mean(dim=1).tolist(), final.std(dim=1, correction=0).tolist()
    summary: dict[str, object] = {}
    for i, name in enumerate(names):
        summary[f"eval/final_distance_mean_{name}"] = means[i]
        summary[f"eval/final_distance_std_{name}"] = stds[i]
        summary[f"eval/final_estimate_run0_{name}"] = tables["w"][i, 0].tolist()
    run.write_summary({
        **summary, "eval/sample_mean_run0": x_bar[0].tolist(), "train/runs": R,
        "train/iterations": cfg.steps,
        "train/step_size_conditions_hold": satisfies_theorem_6_1(cfg.step_power)})
    return run


def comparison_figure(samples: torch.Tensor, history: dict[str, torch.Tensor], names: list[str],
                      cfg: SGDComparisonConfig):
    """Figure 6.5: the paths of run 0 over its samples, and the distance to the mean by k."""
    labels = {"bgd": "BGD", "sgd": "SGD (m=1)"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = samples[0].numpy()
    left.scatter(x[:, 0], x[:, 1], s=8, c="0.6", label="samples")
    x_bar = x.mean(axis=0)
    left.plot(x_bar[0], x_bar[1], "k*", markersize=12, label="mean")
    k = range(history["distance"].shape[0])
    for i, name in enumerate(names):
        label = labels.get(name, f"MBGD (m={name.removeprefix('mbgd_')})")
        path = history["path"][:, i].numpy()
        left.plot(path[:, 0], path[:, 1], "-o", markersize=2.5, linewidth=1, label=label)
        right.plot(k, history["distance"][:, i].numpy(), "-o", markersize=2.5, label=label)
    left.set_aspect("equal")
    left.set_xlabel("x")
    left.set_ylabel("y")
    left.set_title("run 0")
    left.legend(loc="best", fontsize=8)
    right.set_xlabel("iteration step (w_1 at 0)")
    right.set_ylabel("distance to the sample mean")
    right.set_title(f"mean over {cfg.runs} runs")
    right.legend(loc="best", fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"SGD, MBGD and BGD on mean estimation, alpha_k = {_schedule(cfg)}, "
                 f"n = {cfg.n_samples}")
    # Spacing set by hand: tight_layout doubles the (slow) text layout that savefig does anyway.
    fig.subplots_adjust(wspace=0.3, top=0.85)
    return fig
