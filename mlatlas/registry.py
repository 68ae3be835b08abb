"""Every method of the library: its name, family, one-line summary and module.

A method module provides ``Config`` (a :class:`mlatlas.core.config.BaseConfig` dataclass),
``train(cfg, run=None, progress=None) -> Run``, ``sample(run, n, seed, progress) -> Tensor`` and
``evaluate(run, n, seed, progress) -> dict``. Modules are imported only when a method is used,
so ``mlatlas list`` stays quick.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from types import ModuleType

from mlatlas.core.config import ConfigError, closest


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    summary: str
    module_path: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_path)

    @property
    def config_cls(self) -> type:
        return self.module.Config

    @property
    def default_dataset(self) -> str:
        return next((f.default for f in fields(self.config_cls) if f.name == "dataset"), "-")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("ddpm", "generative/diffusion",
               "Denoising diffusion (Ho et al. 2020): linear betas, eps-prediction, ancestral "
               "sampling", "mlatlas.generative.diffusion.ddpm"),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}{closest(name, METHODS)} "
                          f"(known: {', '.join(METHODS)})") from None
