r"""R-FCN (Dai et al. 2016): region-based, fully convolutional; per-region work almost free.

A 1x1 convolution turns the backbone's features into k^2 (C + 1) position-sensitive score
maps, and another into 4 k^2 box maps. Region r is split into k x k bins, and bin (i, j) of
class c pools only score map (c k + i) k + j, the map trained to fire on the (i, j)-th part of
a class-c object (position-sensitive RoI pooling, :func:`mlatlas.vision.pooling.ps_roi_align`).
The bins then vote by averaging:

    s_c(r) = (1/k^2) sum_{i,j} psroi(z_c)(i, j | r)       p(c | r) = softmax(s(r))_c

and likewise for the class-agnostic deltas. All the computation with weights runs once per
image on the whole map; per region there remain only the pooling and the average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from mlatlas.core.config import ConfigError
from mlatlas.vision.common import DetectionConfig
from mlatlas.vision.detector import STRIDE
from mlatlas.vision.pooling import ps_roi_align, ps_roi_pool


def vote(pooled: torch.Tensor) -> torch.Tensor:
    """(K, C) scores: the average of the k x k bins of (K, C, k, k) position-sensitive pools."""
    return pooled.mean((2, 3))


class RFCNHead(nn.Module):
    def __init__(self, channels: int, classes: int, k: int = 3,
                 pooling: Literal["align", "pool"] = "align"):
        super().__init__()
        self.k, self.classes, self.pooling = k, classes, pooling
        self.scores = nn.Conv2d(channels, k * k * (classes + 1), 1)
        self.boxes = nn.Conv2d(channels, k * k * 4, 1)
        nn.init.normal_(self.scores.weight, std=0.01)
        nn.init.normal_(self.boxes.weight, std=0.001)
        nn.init.zeros_(self.scores.bias)
        nn.init.zeros_(self.boxes.bias)

    def pool(self, maps: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if self.pooling == "align":
            return ps_roi_align(maps, rois, self.k, 1 / STRIDE, 2)
        return ps_roi_pool(maps, rois, self.k, 1 / STRIDE)

    def forward(self, features: torch.Tensor, rois: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, C + 1) class logits and (K, 1, 4) class-agnostic deltas for (K, 5) regions."""
        rois = rois.to(features.dtype)
        logits = vote(self.pool(self.scores(features), rois))
        deltas = vote(self.pool(self.boxes(features), rois))
        return logits, deltas.view(len(rois), 1, 4)


@dataclass
class Config(DetectionConfig):
    METHOD: ClassVar[str] = "rfcn"

    k: int = 3
    """Bins per side of the position-sensitive pooling (k x k score maps per class)."""
    pooling: Literal["align", "pool"] = "align"
    """PS-RoI Align (bilinear samples) or PS-RoI pooling (integer bins, as in the paper)."""

    def check(self) -> None:
        super().check()
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")

    def head(self, channels: int, classes: int) -> nn.Module:
        return RFCNHead(channels, classes, self.k, self.pooling)
