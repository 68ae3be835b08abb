"""Image towers and the two-tower (dual-encoder) model of CLIP, SigLIP and LiT.

Image towers map (N, C, H, W) images to a pooled feature (N, width) with ``forward`` and to a
sequence of tokens (N, T, width) with ``tokens`` (what BLIP's text side cross-attends to):

- ``ConvTower``: 3x3 conv stages (three by default, all but the first stride 2) with GroupNorm
  and SiLU; tokens are the positions of the last feature map, the pooled feature their mean.
- ``ViTTower`` (Dosovitskiy et al. 2021): p x p patches linearly embedded, a learned [CLS]
  token and position embeddings, a Transformer; the pooled feature is the [CLS] output.

``DualEncoder`` projects both towers' features into one d-dimensional space,

    x_i = W_img f(image_i) / |.|,   y_j = W_txt g(text_j) / |.|,

and holds the loss's learnable scalars: CLIP's log-scale t (s = exp t, init log 1/0.07), or
SigLIP's t' and b (init log 10 and ``bias_init``, -10 unless given). Its loss is taken over
the global batch of a data-parallel job (``mlatlas.contrastive.distributed``: CLIP's
all-gather, SigLIP's ring; a rank's loss L_r averages to the one-process loss), and in float32
whatever autocast the towers ran under.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.contrastive.distributed import clip_loss_distributed, siglip_loss_distributed
from mlatlas.contrastive.losses import (
    CLIP_LOGIT_SCALE_INIT,
    SIGLIP_BIAS_INIT,
    SIGLIP_T_PRIME_INIT,
    siglip_loss_chunked,
)
from mlatlas.core import distributed
from mlatlas.nn.transformer import Transformer
from mlatlas.nn.unet import norm_groups
from mlatlas.nn.vit import PatchEmbedding


def _check_images(images: torch.Tensor, channels: int) -> None:
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"image tower needs (N, {channels}, H, W) images, "
                         f"got {tuple(images.shape)}")


class ConvTower(nn.Module):
    """``stages`` 3x3 conv stages: width/4 channels at full resolution, then each stage halves
    the resolution (width/2, then width channels). A last-stage feature sees a square of
    1 + 2 (2^(stages-1) - 1) + 2 pixels: 9 at three stages, 17 at four, which is what lets it
    see a whole large shape (13 pixels across) rather than infer it from its edges."""

    def __init__(self, in_channels: int = 3, width: int = 128, stages: int = 3):
        super().__init__()
        if stages < 1:
            raise ValueError(f"a conv tower needs at least one stage, got {stages}")
        self.in_channels, self.width, self.stages = in_channels, width, stages
        channels = [in_channels, width // 4, width // 2] + [width] * (stages - 1)
        channels[stages] = width

        def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(norm_groups(c_out), c_out),
                    nn.SiLU()]

        self.net = nn.Sequential(*(layer for i in range(stages)
                                   for layer in stage(channels[i], channels[i + 1],
                                                      1 if i == 0 else 2)))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.in_channels)
        return self.net(images).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images).mean(1)


class ViTTower(nn.Module):
    """Patch embedding, then a Transformer; the [CLS] output is the image feature."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 width: int = 128, depth: int = 4, heads: int = 4):
        super().__init__()
        self.in_channels, self.image_size, self.width = in_channels, image_size, width
        self.embed = PatchEmbedding(in_channels, width, patch_size, image_size)
        self.transformer = Transformer(width, depth, heads)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.in_channels)
        return self.transformer(self.embed(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0]


def image_tower(kind: Literal["cnn", "vit"], in_channels: int, image_size: int,
                width: int, stages: int = 3) -> nn.Module:
    """A cnn of ``stages`` conv stages, or a ViT (``stages`` does not apply)."""
    if kind == "cnn":
        return ConvTower(in_channels, width, stages)
    # 4x4 patches on 32x32 shapes (64 tokens), 2x2 on 8x8 digits (16 tokens).
    return ViTTower(in_channels, image_size, patch_size=max(1, image_size // 8), width=width)


class DualEncoder(nn.Module):
    """Two towers, two projections and the loss's learnable scalars."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 64,
                 loss: Literal["clip", "siglip"] = "clip", chunk: int = 0,
                 bias_init: float = SIGLIP_BIAS_INIT):
        super().__init__()
        if loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be clip or siglip, got {loss!r}")
        self.image_tower, self.text_tower = image_tower, text_tower
        self.image_projection = nn.Linear(image_tower.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.width, embed_dim, bias=False)
        self.loss_name, self.chunk = loss, chunk
        if loss == "clip":
            self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT))
        else:
            self.t_prime = nn.Parameter(torch.tensor(SIGLIP_T_PRIME_INIT))
            self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.image_tower(images)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_tower(ids, mask)), dim=-1)

    def contrastive_loss(self, image_features: torch.Tensor,
                         text_features: torch.Tensor) -> torch.Tensor:
        """This rank's loss L_r of its pairs against the global batch's (the plain loss of the
        batch in one process). SigLIP's ``chunk`` applies in one process; across processes the
        ring scores one block of n x n pairs at a time, n the local batch."""
        if self.loss_name == "clip":
            return clip_loss_distributed(image_features, text_features, self.logit_scale)
        if self.chunk and not distributed.active():
            return siglip_loss_chunked(image_features, text_features, self.t_prime, self.bias,
                                       self.chunk)
        return siglip_loss_distributed(image_features, text_features, self.t_prime, self.bias)

    def forward(self, images: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x, y = self.encode_image(images), self.encode_text(ids, mask)
        with torch.autocast(x.device.type, enabled=False):
            return self.contrastive_loss(x.float(), y.float())

    def temperature_metrics(self) -> dict[str, torch.Tensor]:
        """The loss's scalars for logging: CLIP's scale s, or SigLIP's t and b."""
        if self.loss_name == "clip":
            return {"logit_scale": self.logit_scale.detach().exp()}
        return {"t": self.t_prime.detach().exp(), "b": self.bias.detach()}
