"""Property-based fuzzing of the command line, run in-process.

Invocations are generated from every method's Config fields, typed: NaN, infinities, huge and
negative integers, text where a number belongs, empty and unicode strings where a name or path
belongs, values for flags that take none. Damaged run folders (a flipped bit, a truncated,
deleted or replaced file, a config.json entry of another type) are fed to ``sample``, ``eval``
and ``train --resume``. Every invocation must end with exit 0, or with exit 2 (bad input) or 1
(a failed run) and one line on stderr; an exception escaping ``main`` is the traceback the
library promises never to show. Bad values of a numeric, choice or flag field must be exit 2,
and so must any flipped bit of a checkpoint.

The default run tries a bounded number of examples; ``pytest -m slow tests/test_fuzz.py`` tries
thousands (``MLATLAS_FUZZ_EXAMPLES`` sets how many per test). With ``MLATLAS_FUZZ_REPORT=FILE``
the invocations tried per family are written to FILE as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlatlas.cli import main
from mlatlas.core.config import _type_hints, flag
from mlatlas.core.io import CheckpointError, load_tensors, read_metadata, save_tensors
from mlatlas.core.run import CHECKPOINT
from mlatlas.registry import METHODS

SLOW_EXAMPLES = int(os.environ.get("MLATLAS_FUZZ_EXAMPLES", "2000"))
TRIED: collections.Counter[str] = collections.Counter()
POINTS = ["--dataset", "8gaussians", "--batch-size", "64", "--hidden", "32", "--log-every", "1",
          "--ckpt-every", "2", "--eval-samples", "0", "--sample-steps", "4", "--no-progress"]
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("MLATLAS_FUZZ_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        for family, count in TRIED.items():
            old[family] = old.get(family, 0) + count
        Path(path).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def invoke(argv: list[str], family: str, capsys) -> tuple[int, list[str]]:
    """Exit code and error lines of one in-process invocation (``run folder:`` is not an
    error line); fails the test with the exception if one escapes ``main``."""
    TRIED[family] += 1
    capsys.readouterr()
    try:
        code = main(argv)
    except BaseException as err:  # any escape is the defect under test
        pytest.fail(f"{argv!r} raised {type(err).__name__}: {err}")
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("run folder: ")]
    if code != 0:
        assert code in (1, 2), (argv, code, lines)
        assert len(lines) == 1 and lines[0].startswith("mlatlas "), (argv, lines)
        assert "Traceback" not in lines[0]
    return code, lines


# --- bad values for every field of every method --------------------------------------------------

def _fields() -> list[tuple[str, str, type, dataclasses.Field]]:
    rows = []
    for method in METHODS.values():
        cls = method.config_cls
        rows += [(method.name, method.family, cls, f) for f in dataclasses.fields(cls)]
    return rows


FIELDS = _fields()
# No path separators or home folders: a generated '/' would name a real folder to scan.
NAME_TEXT = st.text(st.characters(blacklist_characters="/\\~", blacklist_categories=("Cs",)),
                    min_size=1, max_size=12).filter(lambda s: s.strip(". ") != "")
NOT_A_NUMBER = st.sampled_from(["abc", "", " ", "1,5", "one", "--", "ⅷ", "1e", "0x1g", "نان"])


def _bad_value(cls: type, field: dataclasses.Field) -> st.SearchStrategy[tuple[str, bool]]:
    """(command-line text, whether exit 2 is required) for a value ``field`` cannot hold."""
    kind = _type_hints(cls)[field.name]
    name = field.name
    if kind is bool:
        return st.sampled_from(["abc", "1", "yes", ""]).map(lambda v: (f"={v}", True))
    if typing.get_origin(kind) is typing.Literal:
        choices = {str(c) for c in typing.get_args(kind)}
        return NAME_TEXT.filter(lambda s: s not in choices).map(lambda v: (v, True))
    if kind is float:
        values = ["nan", "NaN", "-nan"] + ([] if name in cls.INFINITE else ["inf", "-inf",
                                                                             "1e999"])
        if name == "lr" or name.endswith("_lr") or name.startswith("lr_"):
            values += ["0", "-0.001", "-1e-300"]
        return st.one_of(st.sampled_from(values), NOT_A_NUMBER).map(lambda v: (v, True))
    if kind is int:
        low, high = cls.RANGES.get(name, (-2**63 if name in cls.SIGNED else 0, 2**63 - 1))
        return st.one_of(st.integers(min_value=high + 1, max_value=high + 2**130),
                         st.integers(min_value=low - 2**130, max_value=low - 1),
                         st.sampled_from(["1.5", "1e3", "abc", "", "٣.٠"])).map(
            lambda v: (str(v), True))
    # A name or path: unknown text is refused, by the config or when the data is read; an
    # empty string where the default is not empty is refused too. Text may by chance be valid.
    empty = [("", True)] if field.default else []
    return st.one_of(st.sampled_from([*empty, ("a\0b", True)]), NAME_TEXT.map(lambda v: (v, False)))


@st.composite
def invocations(draw):
    method, family, cls, field = draw(st.sampled_from(FIELDS))
    text, must_refuse = draw(_bad_value(cls, field))
    argv = ["train", method]
    # A flag value that starts with '-' must be glued to its flag, as a user would write it.
    argv.append(f"--{flag(field.name)}{text}" if text.startswith("=") else
                f"--{flag(field.name)}={text}")
    if field.name != "steps":
        argv += ["--steps", "1"]  # a value that happens to be valid trains for one step only
    return family, argv, must_refuse


def _check_invocation(example, tmp_path, capsys):
    family, argv, must_refuse = example
    code, lines = invoke([*argv, "--out", str(tmp_path / "runs"), "--no-progress"], family,
                         capsys)
    if must_refuse:
        assert code == 2, (argv, code, lines)
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(runs.iterdir()), f"{argv} left a run folder"


@settings(FUZZ, max_examples=300)
@given(example=invocations())
def test_bad_values_of_every_field(example, tmp_path, capsys):
    _check_invocation(example, tmp_path, capsys)


@pytest.mark.slow
@settings(FUZZ, max_examples=SLOW_EXAMPLES * 3)
@given(example=invocations())
def test_bad_values_of_every_field_many(example, tmp_path, capsys):
    _check_invocation(example, tmp_path, capsys)


def test_every_method_is_fuzzed():
    assert {m for m, *_ in FIELDS} == set(METHODS)
    assert len(FIELDS) > 10 * len(METHODS)


# --- damaged run folders -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One small finished run per family the damage is tried on: DDPM on points (generative)
    and Bellman evaluation on the GridWorld (tabular RL)."""
    root = tmp_path_factory.mktemp("pristine")
    runs = {}
    for family, argv in (
            ("generative/diffusion", ["ddpm", "--steps", "2", *POINTS]),
            ("rl/tabular", ["bellman", "--steps", "3", "--no-progress"])):
        assert main(["train", *argv, "--out", str(root / family.replace("/", "-"))]) == 0
        (runs[family],) = (root / family.replace("/", "-")).iterdir()
    return runs


FILES = ("config.json", "metrics.csv", CHECKPOINT, "summary.json", "checkpoint.json",
         "policy.csv")
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                        st.floats(allow_nan=False, allow_infinity=False), NAME_TEXT,
                        st.lists(st.integers(), max_size=2), st.just({"a": 1}))


@st.composite
def damages(draw):
    family = draw(st.sampled_from(["generative/diffusion", "rl/tabular"]))
    name = draw(st.sampled_from(FILES))
    kind = draw(st.sampled_from(["flip", "truncate", "delete", "garbage", "config-entry"]))
    command = draw(st.sampled_from(["sample", "eval", "resume"]))
    return family, name, kind, command, draw(st.randoms(use_true_random=False)), draw(JSON_VALUES)


def _damage(run: Path, name: str, kind: str, rng, value) -> bool:
    """Damage ``run``; returns whether the damage is a changed checkpoint byte."""
    path = run / name
    if kind == "config-entry":
        meta = json.loads((run / "config.json").read_text())
        key = rng.choice(sorted(meta["config"]) + ["method", "config", "config_class"])
        if key in meta["config"]:
            meta["config"][key] = value
        else:
            meta[key] = value
        (run / "config.json").write_text(json.dumps(meta))
        return False
    if not path.exists():
        return False
    original = path.read_bytes()
    raw = bytearray(original)
    if kind == "flip" and raw:
        i = rng.randrange(len(raw) * 8)
        raw[i // 8] ^= 1 << (i % 8)
    elif kind == "truncate":
        raw = raw[:rng.randrange(len(raw) + 1)]
    elif kind == "garbage":
        raw = bytearray(rng.randbytes(rng.randrange(1, 64)))
    elif kind == "delete":
        path.unlink()
        return False
    path.write_bytes(bytes(raw))
    return name == CHECKPOINT and bytes(raw) != original


def _check_damage(example, pristine, tmp_path, capsys):
    family, name, kind, command, rng, value = example
    run = Path(shutil.copytree(pristine[family], tmp_path / "run", dirs_exist_ok=True))
    checkpoint_changed = _damage(run, name, kind, rng, value)
    if family == "rl/tabular" and command == "sample":
        command = "eval"  # tabular runs have no samples
    argv = {"sample": ["sample", str(run), "--n", "8"],
            "eval": ["eval", str(run), "--n", "8"],
            "resume": ["train", "--resume", str(run), "--no-progress"]}[command]
    code, lines = invoke(argv, family, capsys)
    if checkpoint_changed:
        # Unless config.json was also broken, the checkpoint is read, and its checksums fail.
        assert code == 2, (example[:4], code, lines)
    shutil.rmtree(run)


@settings(FUZZ, max_examples=25)
@given(example=damages())
def test_damaged_run_folders(example, pristine, tmp_path, capsys):
    _check_damage(example, pristine, tmp_path, capsys)


@pytest.mark.slow
@settings(FUZZ, max_examples=SLOW_EXAMPLES // 2)
@given(example=damages())
def test_damaged_run_folders_many(example, pristine, tmp_path, capsys):
    _check_damage(example, pristine, tmp_path, capsys)


# --- every single-bit flip of a checkpoint -------------------------------------------------------

def flip_detection(path: Path, bits: list[int]) -> tuple[int, list[int]]:
    """How many of the single-bit flips ``bits`` of the file at ``path`` a load detects, and
    the bits it missed (each flip undone before the next)."""
    raw = path.read_bytes()
    missed = []
    for i in bits:
        damaged = bytearray(raw)
        damaged[i // 8] ^= 1 << (i % 8)
        path.write_bytes(bytes(damaged))
        try:
            read_metadata(path)
            load_tensors(path)
        except CheckpointError:
            continue
        missed.append(i)
    path.write_bytes(raw)
    return len(bits) - len(missed), missed


def test_every_bit_flip_of_a_small_checkpoint_is_detected(tmp_path):
    path = tmp_path / CHECKPOINT
    save_tensors(path, {"model.w": torch.randn(2, 3), "model.b": torch.zeros(2),
                        "steps": torch.tensor(7)},
                 metadata={"method": "toy", "state": json.dumps({"step": 7})})
    bits = list(range(path.stat().st_size * 8))
    detected, missed = flip_detection(path, bits)
    assert missed == [], f"{len(missed)} of {len(bits)} flips missed, first at bit {missed[0]}"
    assert detected == len(bits)


@pytest.mark.slow
def test_bit_flips_of_a_trained_checkpoint_are_detected(pristine, capsys):
    """Every bit of the header and metadata, and bits drawn over the tensor data, of the DDPM
    run's checkpoint (about 87 KB)."""
    import random

    path = pristine["generative/diffusion"] / CHECKPOINT
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    rng = random.Random(0)
    size = path.stat().st_size
    bits = list(range(header * 8)) + rng.sample(range(header * 8, size * 8), SLOW_EXAMPLES * 5)
    detected, missed = flip_detection(path, bits)
    with capsys.disabled():
        print(f"\nbit flips of {path.name} ({size} bytes): {len(bits)} tried, {detected} "
              f"detected ({100 * detected / len(bits):.3f}%)")
    assert not missed
