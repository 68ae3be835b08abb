"""Method configs: flat dataclasses whose attribute docstrings are the documentation.

Every method has one ``Config`` dataclass. A field's docstring (the string literal written on the
line after it, as in CleanRL's ``Args``) becomes its ``--help`` text, so the command line needs no
per-method code: :func:`add_config_arguments` derives the flags, :func:`config_from_dict` rebuilds
a config from a run's ``config.json`` and rejects unknown keys with the closest valid names.

Every config, and every options dataclass of ``sample`` and ``eval``, goes through
:func:`check_fields` first: each value must have its field's type, no float may be NaN (nor
infinite, unless the class lists the field in ``INFINITE``), no integer may be negative (unless
listed in ``SIGNED``) or exceed what an int64 holds, learning rates are positive, and a string
field whose default is non-empty may not be empty. A method's own ``check`` then only states
what is particular to it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import typing
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad configuration value or name; the command line prints it as one line."""


def closest(name: str, choices: typing.Iterable[str]) -> str:
    """A ``; did you mean ...?`` hint naming the closest valid choices, or ''."""
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


INT64_MAX = 2**63 - 1
# Ten thousand years at a step per 0.3 ms: a bound no run reaches, low enough that a typo of a few
# extra digits is caught up front.
MAX_STEPS = 10**12


@dataclasses.dataclass
class BaseConfig:
    """Fields shared by every trainable method, and the checks every config runs.

    A method's ``Config`` extends this class directly or through one family base at most. It
    names its method in ``METHOD`` (the run folder's prefix, recorded in ``config.json``),
    declares choice fields as ``Literal[...]`` (checked here, for the command line and for
    Python callers alike), and puts checks that relate fields in :meth:`check`, checks that
    read data or environments in :meth:`check_data`. ``RESUMABLE`` names the fields a resumed
    run may change because they do not alter the trajectory of the parameters.
    """

    METHOD: ClassVar[str] = ""
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"steps", "device", "log_every",
                                                     "ckpt_every"})
    # Fields added after runs of the method were made, each with the value those runs were
    # trained with: a recorded config without the field reads as that value, not the new
    # default, so an older run still rebuilds the model its checkpoint holds.
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {}
    # Float fields for which an infinity means something (NaN never does); integer fields for
    # which a negative value means something.
    INFINITE: ClassVar[frozenset[str]] = frozenset()
    SIGNED: ClassVar[frozenset[str]] = frozenset()
    # Integer fields with a narrower range than 0..2^63-1 (inclusive bounds).
    RANGES: ClassVar[dict[str, tuple[int, int]]] = {name: (1, MAX_STEPS) for name in
                                                    ("steps", "log_every", "ckpt_every")}

    seed: int = 0
    """Seed for initialisation, batch order and noise; the same seed gives the same run on CPU."""
    steps: int = 2000
    """Number of optimisation steps."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available)."""
    log_every: int = 50
    """Write a row of metrics.csv every this many steps."""
    ckpt_every: int = 500
    """Write checkpoint.safetensors every this many steps (and always at the end)."""

    def __post_init__(self) -> None:
        check_options(self)
        self.check()

    def check(self) -> None:
        """Raise ConfigError for values that are wrong together (override, calling super)."""

    def check_data(self) -> None:
        """Raise ConfigError or DatasetError if the data or environment named cannot be used.

        The command line calls it before it makes a run folder, so a typo leaves nothing.
        """

    @classmethod
    def create(cls, **overrides: Any) -> BaseConfig:
        """The config for these command-line values (a family may fill in tuned defaults)."""
        return cls(**overrides)


@dataclasses.dataclass
class BatchConfig(BaseConfig):
    """The base of every method trained on mini-batches by gradient steps: it can run
    data-parallel (``mlatlas train METHOD --nproc N`` or ``torchrun``), in mixed precision and
    compiled. ``SHARDED`` names the fields that are global batch sizes, split over the ranks."""

    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size",)

    precision: typing.Literal["fp32", "bf16", "fp16"] = "fp32"
    """Forward pass under autocast in bf16 or fp16 (fp16 with loss scaling), or fp32."""
    compile: bool = False
    """Compile the network with torch.compile (the first steps pay for the compilation)."""


def _is_lr(name: str) -> bool:
    return name == "lr" or name.endswith("_lr") or name.startswith("lr_")


def check_fields(obj: Any) -> None:
    """ConfigError naming the first field of a dataclass whose value its type cannot hold.

    Types: a bool field holds True or False, an int field an integer (not a bool, not a float),
    a float field a real number (an integer is converted), a str field a string without NUL.
    Ranges: integers in 0..2^63-1 (or -2^63..2^63-1 for the class's ``SIGNED`` fields, or the
    class's ``RANGES``); floats finite (or +-inf for its ``INFINITE`` fields, also given as "inf"
    or "-inf"; never NaN); learning rates (``lr``, ``*_lr``, ``lr_*``) positive; strings
    non-empty where the default is. Literal fields are left to
    :func:`check_choices`.
    """
    cls = type(obj)
    signed = getattr(cls, "SIGNED", frozenset())
    ranges = getattr(cls, "RANGES", {})
    infinite = getattr(cls, "INFINITE", frozenset())
    for field in dataclasses.fields(obj):
        kind, name, value = _field_type(cls, field), field.name, getattr(obj, field.name)
        where = f"--{flag(name)}"
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
        elif kind is int:
            low, high = ranges.get(name, (-INT64_MAX - 1 if name in signed else 0, INT64_MAX))
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer in {_span(low, high)}, "
                                  f"got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{where} must be in {_span(low, high)}, got {value}")
        elif kind is float:
            if name in infinite and value in ("inf", "-inf"):
                value = float(value)  # how config.json records an infinity (config_to_dict)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            value = float(value)
            object.__setattr__(obj, name, value)  # options dataclasses may be frozen
            if math.isnan(value) or (math.isinf(value) and name not in infinite):
                allowed = "a number or +-inf" if name in infinite else "a finite number"
                raise ConfigError(f"{where} must be {allowed}, got {value}")
            if _is_lr(name) and value <= 0:
                raise ConfigError(f"{where} is a learning rate and must be positive, "
                                  f"got {value}")
        elif kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where} must be a string, got {value!r}")
            if "\0" in value:
                raise ConfigError(f"{where} may not contain a NUL character, got {value!r}")
            if not value and field.default:
                raise ConfigError(f"{where} may not be empty (default: {field.default!r})")


def check_options(obj: Any) -> None:
    """:func:`check_fields` then :func:`check_choices`: the ``__post_init__`` of an options
    dataclass (``sample`` and ``eval`` flags) that has no BaseConfig to do it."""
    check_fields(obj)
    check_choices(obj)


def _span(low: int, high: int) -> str:
    def show(v: int) -> str:
        return {INT64_MAX: "2^63-1", -INT64_MAX - 1: "-2^63", MAX_STEPS: "10^12"}.get(v, str(v))

    return f"{show(low)}..{show(high)}"


def require_range(cfg: Any, low: int, high: int, *names: str) -> None:
    """ConfigError naming the first integer field among ``names`` outside ``low..high``."""
    for name in names:
        value = getattr(cfg, name)
        if not low <= value <= high:
            raise ConfigError(f"--{flag(name)} must be in {_span(low, high)}, got {value}")


def check_choices(obj: Any) -> None:
    """ConfigError naming the first ``Literal`` field of a dataclass holding another value."""
    for field in dataclasses.fields(obj):
        kind = _field_type(type(obj), field)
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            value = getattr(obj, field.name)
            if value not in choices:
                raise ConfigError(
                    f"--{flag(field.name)} must be one of {', '.join(map(str, choices))}, "
                    f"got {value!r}{closest(str(value), map(str, choices))}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def require_at_least(cfg: Any, minimum: int, *names: str) -> None:
    """ConfigError naming the first field among ``names`` below ``minimum``."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ConfigError(f"--{flag(name)} must be at least {minimum}, "
                              f"got {getattr(cfg, name)}")


def require_unit(cfg: Any, *names: str, low_open: bool = False) -> None:
    """ConfigError naming the first field among ``names`` outside [0, 1] (or (0, 1])."""
    for name in names:
        value = getattr(cfg, name)
        if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
            raise ConfigError(f"--{flag(name)} must be in {'(0, 1]' if low_open else '[0, 1]'}, "
                              f"got {value}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass (and its bases) to the docstring written below it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    return _type_hints(cls)[field.name]


def add_config_arguments(parser, cls: type, *, suppress_defaults: bool = False) -> None:
    """Add one ``--flag`` per field of ``cls`` to an argparse parser.

    With ``suppress_defaults`` unset flags are absent from the namespace, so a resumed run can
    tell which values the user changed.
    """
    import argparse

    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        default = field.default
        # argparse formats help with %: a literal one ("10% of the lines") must be doubled.
        help_text = f"{docs.get(field.name, '')} (default: {default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_text, "dest": field.name}
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        else:
            kwargs["default"] = default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            # No argparse ``choices``: BaseConfig rejects another value with the closest names,
            # the same message a Python caller gets.
            kwargs["type"] = type(typing.get_args(kind)[0])
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(kind))) + "}"
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = kind.__name__.upper()
        parser.add_argument(f"--{flag(field.name)}", **kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as strict JSON values: an infinite float (an ``INFINITE`` field such as deep
    RL's ``target_return``) is written as the string "inf" or "-inf", which JSON can hold."""
    return {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
            for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from a recorded mapping (a run's config.json), naming any unknown key and
    its closest valid names; a field of ``cls.ADDED_FIELDS`` the mapping lacks takes the value
    runs made before it had."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config field {key!r} for {cls.__qualname__}"
                              f"{closest(key, names)}")
    return cls(**{**getattr(cls, "ADDED_FIELDS", {}), **values})
