r"""One training loop and one evaluation for the adversarial models (GAN, WGAN, WGAN-GP).

Each step of the loop is one generator step k, preceded by n_k critic (discriminator) steps:

    repeat n_k times:   x ~ p_data (the next batch), z ~ N(0, I)
                        take a step on the critic's loss L_D(x, G(z)) (``Config.critic_loss``),
                        then apply its constraint (WGAN clips the weights)
    z ~ N(0, I):        take a step on the generator's loss L_G(f(G(z)))

with n_k = 1 for GAN and WGAN's schedule for the Wasserstein models
(``losses.critic_iterations``). The critic batches are drawn in order from the seeded epochs of
the training set, counted by a checkpointed counter, so a resumed run is bitwise the one that
did not stop. A class-conditional run (``--conditional``) feeds the real batch's labels to the
critic and uniformly drawn labels to the generator.

GAN training can fail without a NaN: a discriminator that separates real from fake perfectly
(its loss pinned near zero) leaves the generator no gradient. The loop stops such a run after
``--collapse-window`` generator steps in a row with the discriminator's loss below 1e-3, with a
one-line explanation, keeping the last good checkpoint.

Evaluation draws ``eval_samples`` samples and scores them: for points, MMD to the test split,
the exact Wasserstein-1 distance to as many test points (an assignment), mode coverage for the
Gaussian mixtures, and for a Wasserstein critic its dual estimate E f(x) - E f(G(z)) on the same
sets beside the exact W1 (the trained critic is the generator's last opponent, not a critic
re-fitted to its final samples, so near equilibrium its estimate sits near 0 while the exact W1
keeps the finite-sample floor: ``baseline/w1_exact``, the W1 between as many real training and
test points); for images, Frechet distance and precision/recall on the shipped
classifier's features, beside the same scores of the untrained generator (``baseline/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mlatlas.core import distributed
from mlatlas.core.config import BatchConfig, ConfigError, check_options, require_at_least
from mlatlas.core.plots import image_grid, metric_curves, samples_figure, show_images
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data import Dataset, EpochBatches, load_dataset
from mlatlas.data.toy2d import mixture_modes
from mlatlas.eval.metrics import mode_coverage, wasserstein1_exact
from mlatlas.eval.samples import min_samples, score_samples
from mlatlas.generative.gan.losses import wasserstein_estimate
from mlatlas.generative.gan.networks import GAN, CriticNorm, dcgan_pair, mlp_pair

# The discriminator loss below which a window of steps counts as "pinned at zero".
PINNED_LOSS = 1e-3
# Training-progress snapshots of the fixed evaluation noise, evenly spaced over the run.
SNAPSHOTS = 8
SNAPSHOT_SAMPLES = {"points": 500, "image": 16}


@dataclass
class AdversarialConfig(BatchConfig):
    """Fields shared by the adversarial models; a method's ``Config`` sets its losses,
    optimisers and critic schedule."""

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = BatchConfig.RESUMABLE | {"eval_samples",
                                                                   "collapse_window"}
    # Whether the critic's output estimates W1 (reported beside the exact W1).
    WASSERSTEIN: ClassVar[bool] = False

    dataset: str = "8gaussians"
    """Training data: a name from `mlatlas list` or a path to an image folder or .npy file."""
    steps: int = 3000
    """Generator steps (each preceded by the critic steps of the method's schedule)."""
    batch_size: int = 256
    """Examples per critic and per generator step."""
    latent_dim: int = 16
    """Dimension of the generator's input noise z ~ N(0, I)."""
    hidden: int = 128
    """Width of the MLPs (points)."""
    depth: int = 3
    """Hidden layers of the MLPs (points)."""
    width: int = 32
    """Base channels of the DCGAN nets (images): w, 2w and 4w."""
    critic_norm: CriticNorm = "none"
    """Normalisation in the image critic: none, batch or layer (WGAN-GP forbids batch)."""
    lr: float = 2e-4
    """Learning rate of the generator and the critic."""
    beta1: float = 0.5
    """Adam's beta1 (the Adam-trained methods)."""
    beta2: float = 0.999
    """Adam's beta2 (the Adam-trained methods)."""
    n_critic: int = 1
    """Critic steps per generator step."""
    grad_clip: float = 0.0
    """Clip each network's global gradient norm to this value (0 turns clipping off)."""
    conditional: bool = False
    """Condition both networks on the class label (projection discriminator)."""
    collapse_window: int = 300
    """Stop after this many generator steps in a row with the discriminator's loss below 1e-3
    (0 turns the check off)."""
    eval_samples: int = 1000
    """Samples drawn by the evaluation at the end of training (0 skips the evaluation)."""

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "latent_dim", "hidden", "depth", "width", "n_critic")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.eval_samples and self.eval_samples < min_samples("image"):
            raise ConfigError(f"--eval-samples must be 0 or at least {min_samples('image')}, "
                              f"got {self.eval_samples}")

    def check_data(self) -> None:
        load_data(self)

    # The method's part -------------------------------------------------------------------------
    def critic_loss(self, model: GAN, real: torch.Tensor, fake: torch.Tensor,
                    y: torch.Tensor | None,
                    generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critic's loss on a real and a (detached) fake batch, and metrics to log."""
        raise NotImplementedError

    def generator_loss(self, f_fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def optimizers(self, model: GAN) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """(generator's, critic's) optimisers: Adam with (beta1, beta2) unless overridden."""
        betas = (self.beta1, self.beta2)
        return (torch.optim.Adam(model.generator.parameters(), lr=self.lr, betas=betas),
                torch.optim.Adam(model.critic.parameters(), lr=self.lr, betas=betas))

    def critic_steps(self, step: int) -> int:
        return self.n_critic

    def constrain(self, critic: nn.Module) -> None:
        """Applied to the critic after each of its steps (weight clipping); nothing here."""


@dataclass
class SampleOptions:
    """How to sample from a trained run."""

    SIGNED: ClassVar[frozenset[str]] = frozenset({"label"})

    label: int = -1
    """Class to sample for a conditional run; -1 cycles through the classes."""

    def __post_init__(self) -> None:
        check_options(self)
        if self.label < -1:
            raise ConfigError(f"--label must be a class index or -1, got {self.label}")


def load_data(cfg: AdversarialConfig) -> Dataset:
    data = load_dataset(cfg.dataset)
    if cfg.conditional and not data.num_classes:
        raise ConfigError(f"--conditional needs class labels and {cfg.dataset} has none")
    if data.kind == "image":
        _, h, w = data.sample_shape
        if h % 4 or w % 4:
            raise ConfigError(f"the DCGAN nets need image sides divisible by 4; {cfg.dataset} "
                              f"holds {h}x{w} images")
        if not (data.x_train.min() >= 0 and data.x_train.max() <= 1):
            raise ConfigError(f"{cfg.dataset}: image values must lie in [0, 1]")
    return data


def build_model(cfg: AdversarialConfig, data: Dataset) -> GAN:
    classes = data.num_classes if cfg.conditional else 0
    if data.kind == "points":
        pair = mlp_pair(data.sample_shape[0], cfg.latent_dim, cfg.hidden, cfg.depth, classes)
    else:
        pair = dcgan_pair(data.sample_shape, cfg.latent_dim, cfg.width, cfg.critic_norm,
                          classes)
    return GAN(*pair)


def _labels(n: int, classes: int, generator: torch.Generator, device) -> torch.Tensor | None:
    return (distributed.randint(0, classes, (n,), generator=generator).to(device)
            if classes else None)


def pinned_discriminator(window: int):
    """The ``diverged`` check of :func:`fit`: a reason once ``d_loss`` has stayed below
    PINNED_LOSS for ``window`` steps in a row (a counter restarted by a resumed run)."""
    count = 0

    def check(metrics) -> str | None:
        nonlocal count
        count = count + 1 if metrics.get("d_loss", 1.0) < PINNED_LOSS else 0
        if window and count >= window:
            return (f"the discriminator's loss stayed below {PINNED_LOSS:g} for {window} "
                    "steps: it rejects every fake and the generator gets no gradient (try "
                    "--g-loss non-saturating, a lower --lr, or wgan_gp)")
        return None

    return check


def train(cfg: AdversarialConfig, run: Run | None = None, progress: bool | None = None) -> Run:
    """Train (or, given a run with a checkpoint, resume) an adversarial model."""
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    generator = seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    opt_g, opt_d = cfg.optimizers(model)
    precision = Precision(cfg.precision, device)
    x_train = data.x_train.to(device)
    y_train = data.y_train.to(device) if cfg.conditional else None
    classes = data.num_classes if cfg.conditional else 0
    batches = EpochBatches(len(x_train), cfg.batch_size, cfg.seed)
    local = cfg.batch_size // distributed.world_size()
    counters = {"critic_batches": torch.zeros((), dtype=torch.long)}
    kind = data.kind
    fixed_z = torch.randn(SNAPSHOT_SAMPLES[kind], cfg.latent_dim,
                          generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    fixed_y = (torch.arange(len(fixed_z), device=device) % classes) if classes else None
    snapshots = {"samples": torch.zeros(SNAPSHOTS, len(fixed_z), *data.sample_shape),
                 "steps": torch.zeros(SNAPSHOTS, dtype=torch.long)}
    snapshot_at = {round(cfg.steps * (i + 1) / SNAPSHOTS): i for i in range(SNAPSHOTS)}
    compile_module(model, cfg.compile)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        logged: dict[str, torch.Tensor] = {}
        for _ in range(cfg.critic_steps(step)):
            counters["critic_batches"] += 1
            index = distributed.shard(batches(int(counters["critic_batches"]))).to(device)
            real = x_train[index]
            y = y_train[index] if y_train is not None else None
            z = distributed.randn((local, cfg.latent_dim), generator=generator).to(device)
            with torch.no_grad(), precision.autocast():
                fake = model.generator(z, y)
            loss_d, metrics = cfg.critic_loss(model, real, fake.float(), y, generator)
            opt_d.zero_grad(set_to_none=True)
            precision.backward(loss_d)
            precision.step(opt_d, model.critic.parameters(), cfg.grad_clip)
            cfg.constrain(model.critic)
            logged = {"d_loss": loss_d.detach(), **metrics}
        z = distributed.randn((local, cfg.latent_dim), generator=generator).to(device)
        y_g = _labels(local, classes, generator, device)
        with precision.autocast():
            loss_g = cfg.generator_loss(model.critic(model.generator(z, y_g), y_g).float())
        opt_g.zero_grad(set_to_none=True)
        precision.backward(loss_g)
        precision.step(opt_g, model.generator.parameters(), cfg.grad_clip)
        if step in snapshot_at:
            snapshots["samples"][snapshot_at[step]] = _draw(model, fixed_z, fixed_y).cpu()
            snapshots["steps"][snapshot_at[step]] = step
        return {**logged, "g_loss": loss_g.detach()}

    fit(run, step_fn, total_steps=cfg.steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
        objects={"model": model, "optimizer": opt_g, "critic_optimizer": opt_d,
                 "rng": generator, "precision": precision, "counters": counters,
                 "snapshots": snapshots},
        diverged=pinned_discriminator(cfg.collapse_window), progress=progress)
    if not distributed.is_main():
        return run
    names = [k for k in run.last_row() if k not in ("step", "wall_s")]
    run.save_figure(metric_curves(run.metrics, names, log=False,
                                  title=f"{cfg.METHOD}: training losses"), "loss.png")
    run.save_figure(progress_figure(snapshots, data, cfg.METHOD), "progress.png")
    run.write_summary({"train/steps": cfg.steps, "train/critic_steps":
                       int(counters["critic_batches"]),
                       **{f"train/{k}": run.last_row()[k] for k in names}})
    if cfg.eval_samples:
        evaluate(run, n=cfg.eval_samples, progress=progress)
    return run


def _draw(model: GAN, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """G(z, y) in eval mode (batch norm on its running statistics), the mode restored."""
    training = model.training
    model.eval()
    with torch.no_grad():
        x = model.generator(z, y)
    model.train(training)
    return x


def progress_figure(snapshots: dict[str, torch.Tensor], data: Dataset, method: str):
    """The fixed noise's samples at evenly spaced steps: one panel per snapshot."""
    import matplotlib.pyplot as plt

    taken = snapshots["steps"] > 0
    samples, steps = snapshots["samples"][taken], snapshots["steps"][taken]
    fig, axes = plt.subplots(1, max(1, len(steps)), figsize=(2.2 * max(1, len(steps)), 2.4))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    ref = data.x_test[:1000]
    for ax, x, step in zip(axes, samples, steps, strict=False):
        if data.kind == "points":
            ax.scatter(*ref.T, s=1, c="0.8")
            ax.scatter(*x.T, s=1, c="C0")
            ax.set_xlim(float(ref[:, 0].min()) - 1, float(ref[:, 0].max()) + 1)
            ax.set_ylim(float(ref[:, 1].min()) - 1, float(ref[:, 1].max()) + 1)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            show_images(ax, x, 4)
        ax.set_title(f"step {int(step)}", fontsize=9)
    fig.suptitle(f"{method}: the same noise through training")
    return fig


# --- a trained run -------------------------------------------------------------------------------

def load_model(run: Run) -> tuple[AdversarialConfig, Dataset, GAN]:
    cfg = run.load_config()
    if not isinstance(cfg, AdversarialConfig):
        raise ConfigError(f"{run.dir} is a {run.method} run, not an adversarial model's")
    data = load_data(cfg)
    model = build_model(cfg, data)
    run.load_weights(model, "model")
    return cfg, data, model.to(resolve_device(cfg.device)).eval()


def generate(model: GAN, cfg: AdversarialConfig, data: Dataset, n: int, seed: int,
             options: SampleOptions) -> torch.Tensor:
    """n samples G(z), z ~ N(0, I) from ``seed`` (labels per ``options`` when conditional)."""
    device = next(model.parameters()).device
    if not cfg.conditional and options.label >= 0:
        raise ConfigError("--label needs a run trained with --conditional")
    if cfg.conditional and options.label >= data.num_classes:
        raise ConfigError(f"--label must be below {data.num_classes}, got {options.label}")
    z = torch.randn(n, cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    y = None
    if cfg.conditional:
        y = (torch.full((n,), options.label) if options.label >= 0
             else torch.arange(n) % data.num_classes).to(device)
    return _draw(model, z.to(device), y).cpu()


def sample(run: Run, n: int = 64, seed: int = 0, progress: bool | None = None,
           options: SampleOptions | None = None) -> torch.Tensor:
    """n samples of the run's generator."""
    cfg, data, model = load_model(run)
    return generate(model, cfg, data, n, seed, options or SampleOptions())


def field_figure(model: GAN, cfg: AdversarialConfig, data: Dataset, x: torch.Tensor,
                 size: int = 150):
    """The discriminator's D(x) = sigmoid(l(x)) (GAN) or the critic's f(x) (WGAN) on a grid
    around the data, the test points and the samples over it."""
    import matplotlib.pyplot as plt

    ref = data.x_test
    low, high = ref.min(0).values - 0.5, ref.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(low[0], high[0], size),
                            torch.linspace(low[1], high[1], size), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.critic(grid.to(device)).cpu()
    value = out if cfg.WASSERSTEIN else torch.sigmoid(out)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    mesh = ax.pcolormesh(gx, gy, value.reshape(size, size), cmap="coolwarm", shading="auto")
    fig.colorbar(mesh, ax=ax, label="critic f(x)" if cfg.WASSERSTEIN else "D(x)")
    ax.scatter(*ref[:1000].T, s=2, c="k", label="data")
    ax.scatter(*x[:1000].T, s=2, c="yellow", label="samples")
    ax.legend(loc="upper right", fontsize=8, markerscale=4)
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    ax.set_title(f"{cfg.METHOD} on {cfg.dataset}: the "
                 f"{'critic' if cfg.WASSERSTEIN else 'discriminator'}'s field")
    return fig


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: SampleOptions | None = None) -> dict:
    """Draw n samples (None: the run's ``eval_samples``) and score them as the module docstring
    says; writes samples.png (and field.png for 2D points) and summary.json's ``eval/`` keys
    (``baseline/``: the untrained generator's scores, for images)."""
    cfg, data, model = load_model(run)
    options = options or SampleOptions()
    n = cfg.eval_samples if n is None else n
    if n < min_samples(data.kind):
        raise ConfigError(f"the evaluation needs at least {min_samples(data.kind)} samples, "
                          f"got {n}")
    x = generate(model, cfg, data, n, seed, options)
    metrics = score_samples(x, data)
    if data.kind == "points":
        m = min(n, len(data.x_test), len(data.x_train))
        metrics["w1_exact"] = wasserstein1_exact(x[:m], data.x_test[:m])
        # Two finite samples of one distribution are W1 apart too: the floor a model can reach.
        run.write_evaluation({"w1_exact": wasserstein1_exact(data.x_train[:m], data.x_test[:m]),
                              "model": f"{m} real training points"}, prefix="baseline")
        if cfg.WASSERSTEIN and not cfg.conditional:
            device = next(model.parameters()).device
            with torch.no_grad():
                metrics["w1_critic_estimate"] = float(wasserstein_estimate(
                    model.critic(data.x_test[:m].to(device)), model.critic(x[:m].to(device))))
        modes = mixture_modes(cfg.dataset)
        if modes is not None:
            metrics.update(mode_coverage(x, *modes))
        if data.sample_shape == (2,):
            run.save_figure(field_figure(model, cfg, data, x), "field.png")
    else:
        with torch.random.fork_rng(devices=[]):  # the run's own initialisation, no side effect
            torch.manual_seed(cfg.seed)
            untrained = build_model(cfg, data).to(next(model.parameters()).device).eval()
        baseline = score_samples(generate(untrained, cfg, data, n, seed, options), data)
        run.write_evaluation({k: v for k, v in baseline.items() if k != "note"},
                             prefix="baseline")
        metrics.update({f"untrained_{k}": v for k, v in baseline.items()
                        if k in ("frechet_distance", "precision", "recall")})
    title = f"{cfg.METHOD} samples, {cfg.dataset}"
    fig = samples_figure(x, title, data.x_test) if data.kind == "points" else \
        image_grid(x[:64], title)
    run.save_figure(fig, "samples.png")
    run.write_evaluation({k: v for k, v in metrics.items() if not k.startswith("untrained_")})
    return metrics
