"""Mixed precision and compilation for the batch trainers.

``--precision bf16`` or ``fp16`` runs the forward pass under ``torch.autocast``: matrix products
and convolutions in half precision, reductions, norms and losses in float32, parameters and
optimizer moments kept in float32. fp16's 5-bit exponent underflows small gradients, so its
loss is scaled before the backward pass, L' = s L, the gradients are unscaled (divided by s)
before clipping and the step, a step whose gradients hold an inf or NaN is skipped and s halved,
and s doubles after every ``growth_interval`` good steps (Micikevicius et al. 2018, "Mixed
Precision Training"). bf16 has float32's exponent range and needs no scaling.

``--compile`` hands a network to ``torch.compile`` (TorchInductor: fused kernels generated for
this machine; the first steps pay for the compilation).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from typing import Any

import torch

from mlatlas.core.config import ConfigError
from mlatlas.core.optim import clip_and_step

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """One-line ConfigError where ``precision`` cannot work on ``device``."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                          "bfloat16 support; use fp16 or fp32")


def check_compile(device: torch.device) -> None:
    """One-line ConfigError where ``torch.compile`` cannot run here."""
    try:  # a private function of torch's; a torch without it reports its own errors
        from torch._dynamo.eval_frame import is_dynamo_supported
    except ImportError:
        def is_dynamo_supported() -> bool:
            return True

    if not is_dynamo_supported():
        raise ConfigError(f"--compile: torch.compile does not support Python "
                          f"{sys.version.split()[0]} in torch {torch.__version__}")
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ConfigError("--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH")


class Precision(torch.nn.Module):
    """Autocast, loss scaling and the optimizer step of one trainer.

    A module only so that ``fit`` checkpoints the fp16 loss scale with everything else (its
    ``state_dict`` is the scaler's state), and a resumed fp16 run continues exactly.
    """

    def __init__(self, precision: str, device: torch.device):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        check_precision(precision, device)
        self.precision, self.device_type = precision, device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters, grad_clip: float) -> float:
        """:func:`~mlatlas.core.optim.clip_and_step` with this trainer's loss scaler."""
        return clip_and_step(optimizer, parameters, grad_clip,
                             self.scaler if self.scaler.is_enabled() else None)

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        if not self.scaler.is_enabled():
            return {}
        return {"scale": self.scaler.get_scale() * torch.ones(()),
                "growth_tracker": torch.tensor(self.scaler.state_dict()["_growth_tracker"])}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if self.scaler.is_enabled() and state_dict:
            self.scaler.load_state_dict({**self.scaler.state_dict(),
                                         "scale": float(state_dict["scale"]),
                                         "_growth_tracker": int(state_dict["growth_tracker"])})


def compile_module(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``module`` compiled in place (its parameters, names and state dict unchanged) when
    ``enabled``; returned for chaining."""
    if enabled:
        module.compile()
    return module
