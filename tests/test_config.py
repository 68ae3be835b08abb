import argparse
import dataclasses

import pytest

from mlatlas.core.config import (
    BaseConfig,
    ConfigError,
    add_config_arguments,
    config_from_dict,
    field_docs,
)
from mlatlas.generative.diffusion.configs import DDPMConfig as Config


def test_every_field_is_documented():
    docs = field_docs(Config)
    assert {f.name for f in dataclasses.fields(Config)} == set(docs)
    assert docs["seed"].startswith("Seed for initialisation")
    assert docs["beta_T"] == "Last forward-process variance beta_T (linear schedule)."


def test_flags_follow_fields_and_types():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Config)
    args = parser.parse_args(["--steps", "7", "--beta-T", "0.03", "--no-clip-x0",
                              "--variance", "beta"])
    cfg = Config(**vars(args))
    assert (cfg.steps, cfg.beta_T, cfg.clip_x0, cfg.variance) == (7, 0.03, False, "beta")
    assert "(default: 2000)" in parser.format_help()


def test_suppressed_defaults_leave_only_given_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Config, suppress_defaults=True)
    assert vars(parser.parse_args(["--lr", "0.1"])) == {"lr": 0.1}


def test_unknown_field_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        config_from_dict(Config, {"batch_sise": 3})


@pytest.mark.parametrize("bad", [{"steps": 0}, {"log_every": -1}])
def test_base_validation(bad):
    with pytest.raises(ConfigError):
        BaseConfig(**bad)


@pytest.mark.parametrize("bad", [{"beta_1": 0.1, "beta_T": 0.01}, {"T": 1}, {"ema_decay": 1.0},
                                 {"batch_size": 0}])
def test_ddpm_validation(bad):
    with pytest.raises(ConfigError):
        Config(**bad)


def test_help_text_may_hold_a_percent_sign():
    @dataclasses.dataclass
    class Percent(BaseConfig):
        share: float = 0.1
        """Hold out 10% of the lines."""

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Percent)
    assert "10% of the lines" in parser.format_help()
