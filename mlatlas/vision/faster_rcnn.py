r"""Faster R-CNN (Ren et al. 2015): a region proposal network and a per-region head on RoI Align.

Every region of interest r is pooled to a fixed 7 x 7 grid of the backbone's features by RoI
Align (He et al. 2017; half-pixel ``aligned``, 2 x 2 samples per bin), and a two-layer MLP
scores it:

    h = MLP(flatten(RoIAlign(F, r)))     p(c | r) = softmax(W_cls h)_c     t^c = W_box h

with C + 1 classes (0 the background) and class-specific box deltas t^c. Per region the head
does O(C_F 7^2 d) work, the part R-FCN removes. The shared parts (backbone, RPN, sampling,
losses, inference) are in :mod:`mlatlas.vision.detector`; the loop in :mod:`mlatlas.vision.common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mlatlas.vision.common import DetectionConfig
from mlatlas.vision.detector import STRIDE
from mlatlas.vision.pooling import roi_align


class FasterRCNNHead(nn.Module):
    def __init__(self, channels: int, classes: int, pool: int = 7, hidden: int = 256):
        super().__init__()
        self.pool = pool
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels * pool * pool, hidden),
                                 nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.classify = nn.Linear(hidden, classes + 1)
        self.regress = nn.Linear(hidden, 4 * (classes + 1))
        nn.init.normal_(self.classify.weight, std=0.01)
        nn.init.normal_(self.regress.weight, std=0.001)
        nn.init.zeros_(self.classify.bias)
        nn.init.zeros_(self.regress.bias)

    def forward(self, features: torch.Tensor, rois: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, C + 1) class logits and (K, C + 1, 4) deltas for (K, 5) regions."""
        pooled = roi_align(features, rois.to(features.dtype), self.pool, 1 / STRIDE, 2,
                           aligned=True)
        h = self.mlp(pooled)
        return self.classify(h), self.regress(h).view(len(h), -1, 4)


@dataclass
class Config(DetectionConfig):
    METHOD: ClassVar[str] = "faster_rcnn"

    hidden: int = 256
    """Width of the head's two-layer MLP."""

    def head(self, channels: int, classes: int) -> nn.Module:
        return FasterRCNNHead(channels, classes, hidden=self.hidden)
