"""Deprecated alias: the language-model methods moved to :mod:`mlatlas.llm` in mlatlas 0.2.

``import mlatlas.rl.llm.grpo`` (or any other submodule) still works for this release and gives
the very module object of ``mlatlas.llm.grpo``, with a DeprecationWarning; the alias goes in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_OLD, _NEW = __name__, "mlatlas.llm"

warnings.warn(f"{_OLD} moved to {_NEW}; import it from there (this alias goes in mlatlas 0.3)",
              DeprecationWarning, stacklevel=2)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``mlatlas.rl.llm.X`` to the already imported (or now imported) ``mlatlas.llm.X``."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name.startswith(_OLD + ".") else None

    def create_module(self, spec):
        return importlib.import_module(_NEW + spec.name[len(_OLD):])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Alias())


def __getattr__(name: str):
    try:
        return importlib.import_module(f"{_NEW}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {_OLD!r} has no attribute {name!r}") from None
