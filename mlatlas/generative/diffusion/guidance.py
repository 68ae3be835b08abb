r"""Guidance: trading diversity for fidelity to a class label at sampling time.

Classifier-free guidance (Ho & Salimans 2021). One network is trained on labelled data with the
label replaced by a null label with probability p_uncond, so it models both eps(x_t, y) and
eps(x_t). Sampling uses

    eps_tilde(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t)

with guidance weight w (w = 0: the plain conditional model; diffusers' guidance_scale is 1 + w).
Every prediction of ``parameterization.py`` and the EDM/VE network output F is affine in the
network's output with coefficients that do not depend on it, so the same combination of raw
network outputs guides D, v and flow-matching velocities alike.

Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
Sec. 4), written on the scale-free x = x_0 + sigma eps of ``edm.py``. A classifier
p_phi(y | x; sigma) is trained on noisy inputs by cross-entropy,

    L(phi) = E_{x_0, y, sigma, eps} [ -log p_phi(y | x_0 + sigma eps; sigma) ],
    ln sigma ~ U(ln sigma_min, ln sigma_max)   (default [0.002, 80], the samplers' whole range),

seeing c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and the noise level through an
embedding of c_noise = ln(sigma) / 4 (EDM's preconditioning, ``edm.edm_preconditioning``).
Since p(x | y; sigma) is proportional to p(y | x; sigma) p(x; sigma), the conditional score is
grad log p(x | y) = grad log p(x) + grad log p(y | x); Dhariwal & Nichol scale the second term
by s. With the score (D(x; sigma) - x) / sigma^2 that is the guided denoiser

    D_tilde(x; sigma) = D(x; sigma) + s sigma^2 grad_x log p_phi(y | x; sigma),

which any sampler of ``samplers.py`` integrates unchanged. At s = 1 with the exact classifier
and the exact D it is the exact conditional denoiser E[x_0 | x, y]; s > 1 sharpens p(y | x)
to p(y | x)^s. (Classifier-free guidance is the same idea with the implicit classifier
p(y | x) proportional to p(x | y) / p(x): (1 + w) D(x | y) - w D(x) = D(x) + (1 + w)
sigma^2 grad log p(y | x), so its w corresponds to s = 1 + w.)

Diversity, the quantity guidance trades away. For images, f is the shipped classifier's 128-d
feature map (``mlatlas.eval.classifier``); for points, the coordinates. For each class c,

    spread(c) = mean over pairs i != j with y_i = y_j = c of || f(x_i) - f(x_j) ||,

and ``diversity`` is the mean over classes of spread_generated(c) / spread_test(c), the
generated samples grouped by the label they were asked for, the test images by their true
label. 1 means samples of a label spread as widely as real images of that class; guidance that
collapses each class towards a prototype drives it towards 0. For samples that ignore their
label (an unconditional model, s = 0) it measures the spread of the whole distribution and
exceeds 1.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from mlatlas.core.io import CheckpointError, load_tensors, read_metadata, save_tensors
from mlatlas.core.progress import progress_bar
from mlatlas.data import Dataset, EpochBatches
from mlatlas.generative.diffusion import edm
from mlatlas.nn.layers import mlp
from mlatlas.nn.unet import ResBlock, timestep_embedding

# c_noise = ln(sigma) / 4 spans about [-1.6, 1.1] over [0.002, 80]; the sinusoidal embedding
# was made for step indices in the hundreds (``formulations.Preconditioned`` stretches EDM's
# c_noise alike).
TIME_SCALE = 250.0
METADATA_KEY = "noisy_classifier"


def classifier_free(model: nn.Module, labels: torch.Tensor | None, w: float):
    """The network with labels bound, guided with weight ``w``: a function (x, t) -> output.
    ``labels=None`` (an unconditional model) returns the model itself; the conditional and
    unconditional passes run as one batch of twice the size. ``labels`` are class indices, or
    any condition of a model that says what its null one is (``model.null_condition(labels)``,
    e.g. the empty caption's ids for latent diffusion)."""
    if labels is None:
        return model
    if w == 0:
        return lambda x, t: model(x, t, labels)
    null = model.null_condition(labels) if hasattr(model, "null_condition") else \
        torch.full_like(labels, model.labels.num_classes)

    both = torch.cat([labels, null])  # the same every step: built once, as the prompts are

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), t.repeat(2), both)
        conditional, unconditional = out.chunk(2)
        return torch.add(unconditional, conditional - unconditional, alpha=1 + w)

    return guided


def label_accuracy(x: torch.Tensor, labels: torch.Tensor, data: Dataset) -> dict:
    """The share of samples that the shipped classifier of ``data`` assigns to the requested
    label (empty for data without a shipped classifier)."""
    from mlatlas.eval.classifier import load_feature_net

    try:
        net = load_feature_net(data.name)
    except FileNotFoundError:
        return {}
    with torch.no_grad():
        predicted = torch.cat([net(chunk).argmax(1) for chunk in x.split(1000)])
    return {"label_accuracy": float((predicted == labels).double().mean())}


# --- the noise-aware classifier ----------------------------------------------------------------

def _check_labels(labels: torch.Tensor, num_classes: int | None, batch: int | None = None,
                  what: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{what} must be a 1-d tensor of class indices, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be integer class indices, got {labels.dtype}")
    if batch is not None and len(labels) != batch:
        raise ValueError(f"{len(labels)} {what} for a batch of {batch}")
    if num_classes is not None and len(labels) and (
            int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} must lie in 0..{num_classes - 1}, got values from "
                         f"{int(labels.min())} to {int(labels.max())}")


class NoisyClassifier(nn.Module):
    """p_phi(y | x; sigma) on the scale-free x = x_0 + sigma eps: ``forward(x, sigma)`` returns
    logits (B, num_classes) for x of shape (B, *sample_shape) and sigma of shape (B,).

    Images (C, H, W): three ResBlocks of ``mlatlas.nn.unet`` (widths w, 2w, 2w, stride-2
    convolutions between them, so 8x8 -> 2x2 and 28x28 -> 7x7), global average pooling and a
    linear head.
    Points (D,): an MLP of three SiLU layers of width w on (c_in x, embedding of c_noise).
    SiLU rather than ReLU everywhere: guidance differentiates the classifier in x, and a
    smooth network gives a smooth gradient field.
    """

    def __init__(self, sample_shape: tuple[int, ...] | list[int], num_classes: int,
                 width: int | None = None, sigma_data: float = edm.SIGMA_DATA):
        super().__init__()
        sample_shape = tuple(int(n) for n in sample_shape)
        if len(sample_shape) not in (1, 3) or min(sample_shape) < 1:
            raise ValueError(f"sample_shape must be (D,) for points or (C, H, W) for images, "
                             f"got {sample_shape}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.kind = "image" if len(sample_shape) == 3 else "points"
        width = width or (32 if self.kind == "image" else 128)
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.sample_shape, self.num_classes = sample_shape, num_classes
        self.width, self.sigma_data = width, float(sigma_data)
        if self.kind == "image":
            self._build_cnn(sample_shape[0], width, num_classes)
        else:
            self._build_mlp(sample_shape[0], width, num_classes)

    def _build_cnn(self, channels: int, w: int, num_classes: int) -> None:
        emb = 4 * w
        self.time_mlp = nn.Sequential(nn.Linear(w, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(channels, w, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(w, w, emb), ResBlock(w, 2 * w, emb),
                                     ResBlock(2 * w, 2 * w, emb)])
        self.downs = nn.ModuleList([nn.Conv2d(w, w, 3, 2, 1), nn.Conv2d(2 * w, 2 * w, 3, 2, 1),
                                    nn.Identity()])
        self.head = nn.Sequential(nn.GroupNorm(8 if (2 * w) % 8 == 0 else 1, 2 * w), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * w, num_classes))

    def _build_mlp(self, dim: int, w: int, num_classes: int) -> None:
        self.time_dim = 64
        self.mlp = mlp(dim + self.time_dim, (w, w, w), num_classes, nn.SiLU, orthogonal=False)

    @classmethod
    def for_data(cls, data: Dataset, width: int | None = None,
                 sigma_data: float = edm.SIGMA_DATA) -> NoisyClassifier:
        """A classifier for the samples and classes of a labelled dataset."""
        if not data.num_classes:
            raise ValueError(f"{data.name} has no class labels to train a classifier on")
        return cls(data.sample_shape, data.num_classes, width, sigma_data)

    @property
    def config(self) -> dict:
        """The constructor's arguments (stored with the weights)."""
        return {"sample_shape": list(self.sample_shape), "num_classes": self.num_classes,
                "width": self.width, "sigma_data": self.sigma_data}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"the classifier takes samples of shape {self.sample_shape}, got "
                             f"{tuple(x.shape[1:])}")
        if sigma.shape != (len(x),):
            raise ValueError(f"sigma must have shape ({len(x)},), got {tuple(sigma.shape)}")
        sigma = sigma.to(x.device, x.dtype)
        c_in = (sigma**2 + self.sigma_data**2).rsqrt()
        c_noise = sigma.log() / 4
        x_in = c_in.reshape(-1, *([1] * (x.ndim - 1))) * x
        if self.kind == "points":
            emb = timestep_embedding(c_noise * TIME_SCALE, self.time_dim).to(x.dtype)
            return self.mlp(torch.cat([x_in, emb], dim=1))
        emb = self.time_mlp(timestep_embedding(c_noise * TIME_SCALE, self.width).to(x.dtype))
        h = self.stem(x_in)
        for block, down in zip(self.blocks, self.downs, strict=True):
            h = down(block(h, emb))
        return self.head(h)


def noisy_classifier_loss(classifier: NoisyClassifier, x0: torch.Tensor, y: torch.Tensor,
                          generator: torch.Generator | None = None,
                          sigma_min: float = edm.SIGMA_MIN,
                          sigma_max: float = edm.SIGMA_MAX) -> torch.Tensor:
    """Cross-entropy of ``classifier`` on x = x_0 + sigma eps with ln sigma ~ U(ln sigma_min,
    ln sigma_max); x0 (B, *sample_shape) in model space, y (B,) class indices."""
    _check_labels(y, classifier.num_classes, len(x0), "y")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    sigma = edm.log_uniform_sigmas(len(x0), sigma_min, sigma_max, generator).to(x0.device, x0.dtype)
    # Noise drawn on the CPU so that a seed gives the same classifier on any device.
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * eps
    return nn.functional.cross_entropy(classifier(x, sigma), y.to(x0.device))


def train_noisy_classifier(x0: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, *,
                           batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                           device: str | torch.device = "cpu", width: int | None = None,
                           sigma_min: float = edm.SIGMA_MIN, sigma_max: float = edm.SIGMA_MAX,
                           sigma_data: float = edm.SIGMA_DATA,
                           progress: bool | None = None) -> NoisyClassifier:
    """Fit a NoisyClassifier to (x0, y) by Adam on ``noisy_classifier_loss``; x0 (N, ...) in
    model space (images in [-1, 1]), y (N,). Returns it in eval mode on ``device``."""
    _check_labels(y, num_classes, len(x0), "y")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = NoisyClassifier(tuple(x0.shape[1:]), num_classes, width, sigma_data).to(device)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    x0, y = x0.to(device), y.to(device)
    batches = EpochBatches(len(x0), min(batch_size, len(x0)), seed)
    bar = progress_bar(range(1, steps + 1), desc="noisy classifier", progress=progress)
    for step in bar:
        index = batches(step).to(device)
        loss = noisy_classifier_loss(classifier, x0[index], y[index], generator, sigma_min,
                                     sigma_max)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return classifier.eval()


def save_noisy_classifier(classifier: NoisyClassifier, path: str | os.PathLike) -> None:
    """Weights as safetensors (written atomically), the constructor's arguments as metadata."""
    save_tensors(path, classifier.state_dict(),
                 metadata={METADATA_KEY: json.dumps(classifier.config)})


def load_noisy_classifier(path: str | os.PathLike,
                          device: str | torch.device = "cpu") -> NoisyClassifier:
    """A classifier saved by ``save_noisy_classifier``, in eval mode."""
    meta = read_metadata(path)
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path} holds no noisy classifier (no '{METADATA_KEY}' metadata)")
    classifier = NoisyClassifier(**json.loads(meta[METADATA_KEY]))
    try:
        classifier.load_state_dict(load_tensors(path))
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match its recorded architecture: "
                              f"{str(err).splitlines()[0]}") from None
    return classifier.to(device).eval()


def classifier_guided(denoiser, classifier: nn.Module, labels: torch.Tensor, scale: float):
    """The denoiser D(x, sigma) of ``samplers.py`` guided towards ``labels`` (B,):
    D(x; sigma) + scale sigma^2 grad_x log p(labels | x; sigma), with ``classifier(x, sigma)``
    returning logits for sigma of shape (B,). Scale 0 returns ``denoiser`` itself."""
    if not math.isfinite(scale):
        raise ValueError(f"the guidance scale must be a finite number, got {scale}")
    _check_labels(labels, getattr(classifier, "num_classes", None))
    if scale == 0:
        return denoiser

    def guided(x: torch.Tensor, sigma: float) -> torch.Tensor:
        _check_labels(labels, None, len(x))
        denoised = denoiser(x, sigma)
        if sigma == 0:  # sigma^2 grad log p vanishes, and ln(0) would poison the classifier
            return denoised
        # The samplers run under no_grad; the gradient in x needs a graph of its own.
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, torch.full((len(x),), sigma, dtype=x.dtype,
                                                 device=x.device))
            log_p = logits.log_softmax(1).gather(1, labels.to(x.device)[:, None]).sum()
            grad = torch.autograd.grad(log_p, x_in)[0]
        return denoised + scale * sigma**2 * grad.to(denoised.dtype)

    return guided


# --- diversity ---------------------------------------------------------------------------------

def class_spread(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean distance between distinct pairs of rows of ``features`` (N, F) that share a label,
    one value per class (C,); NaN for a class with fewer than two rows."""
    _check_labels(labels, num_classes, len(features))
    onehot = nn.functional.one_hot(labels, num_classes).double()
    distances = torch.cdist(features.double(), features.double())
    # sum_{ij} [y_i = c] d_ij [y_j = c] is the c-th diagonal entry of M^T D M.
    totals = (onehot.T @ distances @ onehot).diagonal()
    counts = onehot.sum(0)
    pairs = counts * (counts - 1)
    return torch.where(pairs > 0, totals / pairs.clamp(min=1), torch.nan)


def diversity(x: torch.Tensor, labels: torch.Tensor, data: Dataset) -> dict:
    """Mean over classes of the within-label spread of samples ``x`` (data space: images in
    [0, 1]) over that of the test split (see the module docstring); empty for data without
    labels or, for images, without a shipped feature network."""
    if not data.num_classes or data.y_test is None:
        return {}
    if data.kind == "image":
        from mlatlas.eval.classifier import image_features, load_feature_net

        try:
            net = load_feature_net(data.name)
        except FileNotFoundError:
            return {}
        fake, real = image_features(net, x), image_features(net, data.x_test)
    else:
        fake, real = x.flatten(1), data.x_test.flatten(1)
    ratio = (class_spread(fake, labels.cpu(), data.num_classes)
             / class_spread(real, data.y_test, data.num_classes))
    diversity = float(ratio.nanmean())
    # Undefined (None, JSON's null) when no class drew the two samples a spread needs.
    return {"diversity": diversity if math.isfinite(diversity) else None}
