r"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

The encoder maps an image x to z_e(x) (D, h, w); each of its h w vectors is replaced by the
nearest of K codes e_1..e_K, z_q = e_k, k = argmin_j ||z_e - e_j||^2; the decoder reconstructs
x_hat from z_q. The straight-through estimator z_q^ST = z_e + sg[z_q - z_e] copies the decoder's
gradient to the encoder, and the loss is

    L = ||x - x_hat||^2 + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2,      beta = 0.25,

the codebook loss (second term) updating only the codes, the commitment loss (third) only the
encoder. With ``--codebook ema`` (the default) the codes are instead the exponential moving
averages of the encoder outputs assigned to them (decay 0.99, Laplace smoothing 1e-5) and the
codebook loss is dropped; codes unused for ``--dead-window`` steps restart at random encoder
outputs. The equations of the quantiser are in :mod:`mlatlas.generative.vq.quantizer`; the loop
and the evaluation (reconstruction MSE/PSNR, code usage, perplexity) in
:mod:`mlatlas.generative.vq.common`.

With no prior, :func:`sample` returns reconstructions of held-out images; the ``vq_transformer``
method learns an autoregressive prior over the code indices and samples new images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mlatlas.generative.vq.common import (
    AutoencoderConfig,
    CodebookConfig,
    evaluate,
    sample,
    train,
)

__all__ = ["Config", "evaluate", "sample", "train"]


@dataclass
class Config(CodebookConfig, AutoencoderConfig):
    """VQ-VAE: the family's fields and the codebook's."""

    METHOD: ClassVar[str] = "vqvae"
