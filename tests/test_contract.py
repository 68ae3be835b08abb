"""The family contract of docs/architecture.md, checked over every registered method."""

import dataclasses
import inspect
import typing

import pytest

from mlatlas.core.config import BaseConfig, BatchConfig, ConfigError, field_docs
from mlatlas.registry import METHODS

CONFIGS = {name: method.config_cls for name, method in METHODS.items()}
# Methods fitted by counting, with no gradient step.
COUNTED = {"ngram"}


@pytest.mark.parametrize("name", METHODS)
def test_config_names_its_method_and_has_at_most_one_family_base(name):
    cls = CONFIGS[name]
    assert name == cls.METHOD
    between = [c for c in cls.__mro__[1:] if issubclass(c, BaseConfig)
               and c not in (BaseConfig, BatchConfig)]
    assert len(between) <= 1, f"{cls.__qualname__} -> {[c.__qualname__ for c in between]}"
    assert not any(dataclasses.is_dataclass(c) and c.__name__ in {m.config for m in
                                                                  METHODS.values()}
                   and c.METHOD for c in between), "a method's Config extends another method's"


@pytest.mark.parametrize("name", METHODS)
def test_mini_batch_trainers_can_run_data_parallel(name):
    """Every method trained by gradient steps on mini-batches is a BatchConfig (data-parallel,
    --precision, --compile); the RL methods step environments and the n-gram model counts, and
    are not, and each global batch field it names for sharding exists."""
    cls, family = CONFIGS[name], METHODS[name].family
    by_gradient = not (family.startswith("rl/") or name in COUNTED)
    assert issubclass(cls, BatchConfig) == by_gradient, family
    if issubclass(cls, BatchConfig):
        assert cls.SHARDED and all(s in {f.name for f in dataclasses.fields(cls)}
                                   for s in cls.SHARDED)


@pytest.mark.parametrize("name", METHODS)
def test_every_field_is_documented_and_defaults_are_valid(name):
    cls = CONFIGS[name]
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{name}: fields without a docstring: {missing}"
    cls()  # the documented defaults pass the config's own checks


@pytest.mark.parametrize("name", METHODS)
def test_choice_fields_are_literals_checked_for_python_callers(name):
    cls = CONFIGS[name]
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            with pytest.raises(ConfigError, match=f"--{field.name.replace('_', '-')}"):
                cls(**{field.name: "not-a-choice"})


@pytest.mark.parametrize("name", METHODS)
def test_evaluate_and_sample_take_run_n_seed_progress(name):
    method = METHODS[name]
    for kind in ("sample", "evaluate"):
        if getattr(method, kind) is None:
            continue
        parameters = list(inspect.signature(method.function(kind)).parameters)
        assert parameters[:4] == ["run", "n", "seed", "progress"], (name, kind, parameters)
