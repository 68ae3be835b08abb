"""Every case of issue 18's "Found" list: bad input is one line and exit 2, a failed run one line
and exit 1, never a traceback, never a silent NaN, nothing half-written."""

import json
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlatlas.cli import main
from mlatlas.core.config import BaseConfig, ConfigError, config_from_dict
from mlatlas.core.io import (
    CheckpointError,
    NonFiniteError,
    load_tensors,
    read_json,
    read_metadata,
    save_tensors,
    write_json,
)
from mlatlas.core.run import CHECKPOINT, Run

POINTS = ["--dataset", "8gaussians", "--batch-size", "64", "--hidden", "32", "--log-every", "1",
          "--ckpt-every", "2", "--eval-samples", "0", "--sample-steps", "4", "--no-progress"]


def cli(argv, capsys):
    """Exit code and stderr lines of one in-process invocation, less the line naming the run
    folder (an exception escaping main is the traceback the library promises never to show)."""
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in lines if not line.startswith("run folder: ")]


def refused(argv, capsys, *words, code=2):
    got, err = cli(argv, capsys)
    assert got == code, (argv, err)
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


@pytest.fixture(scope="module")
def points_run(tmp_path_factory):
    """A 2-step DDPM run on 8 Gaussians, copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "ddpm", "--steps", "2", "--out", str(root), *POINTS]) == 0
    (path,) = root.iterdir()
    return path


@pytest.fixture
def run_copy(points_run, tmp_path):
    import shutil

    return shutil.copytree(points_run, tmp_path / "run")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- values on the command line ------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["train", "ddpm", "--lr", "nan"], ["--lr", "nan", "finite"]),
    (["train", "ppo", "--lr", "nan"], ["--lr", "nan"]),
    (["train", "grpo", "--lr", "nan"], ["--lr", "nan"]),
    (["train", "ddpm", "--lr", "inf"], ["--lr", "inf"]),
    (["train", "ddpm", "--lr=-1e-3"], ["--lr", "learning rate", "positive"]),
    (["train", "ddpm", "--seed", "99999999999999999999"], ["--seed", "0..2^63-1"]),
    (["train", "ddpm", "--seed", "-1"], ["--seed", "0..2^63-1", "-1"]),
    (["train", "ddpm", "--steps", str(10**23)], ["--steps", "1..10^12", str(10**23)]),
    (["train", "ddpm", "--grad-clip", "nan"], ["--grad-clip", "nan"]),
    (["train", "ddpm", "--beta-T", "nan"], ["--beta-T", "nan"]),
    (["train", "dpo", "--beta", "nan"], ["--beta", "nan"]),
    (["train", "ppo", "--target-return", "nan"], ["--target-return", "nan", "+-inf"]),
    (["train", "bellman", "--r-forbidden", "nan"], ["--r-forbidden", "nan"]),
    (["train", "ddpm", "--threads", "-4"], ["--threads", "0..1024", "-4"]),
    (["train", "ddpm", "--dataset", ""], ["--dataset", "may not be empty"]),
    (["train", "ddpm", "--channels", "1"], ["--channels", "even"]),
    (["train", "ddpm", "--eval-samples", "1"], ["at least 4", "got 1", "--eval-samples"]),
    (["train", "ddpm", "--dataset", "two-moons", "--eval-samples", "1"],
     ["at least 2", "MMD"]),
    (["train", "ddpm", "--nproc", str(10**6)], ["--nproc", "1..1024"]),
    (["train", "sft", "--data", "a\0b"], ["--data", "NUL"]),
])
def test_bad_values_are_refused_up_front(argv, words, capsys, in_tmp):
    refused([*argv, "--out", "runs"], capsys, *words)
    assert not (in_tmp / "runs").exists()  # refused before a run folder was made


def test_an_infinite_target_return_is_still_the_default_and_accepted():
    from mlatlas.rl.deep.ppo import Config

    assert Config(target_return=float("inf")).target_return == float("inf")
    with pytest.raises(ConfigError, match="--lr must be a finite number"):
        Config(lr=float("inf"))


def test_the_threads_variable_is_checked(capsys, in_tmp, monkeypatch):
    monkeypatch.setenv("MLATLAS_THREADS", "many")
    refused(["train", "bellman", "--steps", "1", "--out", "runs"], capsys, "$MLATLAS_THREADS",
            "'many'")


def test_guidance_and_seed_of_sample_are_checked(points_run, capsys):
    refused(["sample", str(points_run), "--guidance", "nan"], capsys, "--guidance", "nan")
    refused(["sample", str(points_run), "--guidance", "inf"], capsys, "--guidance", "inf")
    refused(["sample", str(points_run), "--seed", "99999999999999999999"], capsys, "--seed",
            "0..2^63-1")
    refused(["eval", str(points_run), "--n", "1"], capsys, "at least 2", "got 1")
    assert not list(points_run.glob("samples-*"))


def test_image_eval_needs_more_samples_than_neighbours(tmp_path, capsys):
    from mlatlas.generative.diffusion import loop
    from mlatlas.generative.diffusion.configs import DDPMConfig

    data = loop.load_data(DDPMConfig())
    for n in (1, 3):
        with pytest.raises(ConfigError, match=f"at least 4 samples.*got {n}"):
            loop.eval_count(DDPMConfig(), n, data)
    assert loop.eval_count(DDPMConfig(), 4, data) == 4


def test_non_finite_samples_are_an_error_not_a_file(points_run, capsys, monkeypatch):
    from mlatlas.generative.diffusion import loop

    monkeypatch.setattr(loop, "sample", lambda run, n, seed, **k: torch.full((n, 2), torch.nan))
    refused(["sample", str(points_run), "--n", "8"], capsys, "8 of 8 samples", "NaN", code=1)
    assert not list(points_run.glob("samples-*"))


def test_method_names_are_case_insensitive(capsys, in_tmp):
    refused(["train", "DDPM", "--steps", "0"], capsys, "--steps")
    refused(["train", "Rectified-Flow", "--steps", "0"], capsys, "--steps")


def test_out_naming_a_file_is_a_usage_error(capsys, in_tmp):
    (in_tmp / "file").write_text("")
    refused(["train", "ddpm", "--out", "file"], capsys, "--out file is a file")


# --- data files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 3])
def test_points_the_diffusion_methods_cannot_draw_are_refused_before_training(dim, capsys,
                                                                               in_tmp):
    np.save(in_tmp / "points.npy", np.random.default_rng(0).normal(size=(100, dim)))
    refused(["train", "ddpm", "--dataset", "points.npy", "--out", "runs"], capsys,
            f"points in {dim} dimensions", "(N, 2)")
    assert not (in_tmp / "runs").exists()


def test_nan_pixels_are_refused(capsys, in_tmp):
    images = np.random.default_rng(0).random((20, 8, 8))
    images[3, 4, 5] = np.nan
    np.save(in_tmp / "images.npy", images)
    refused(["train", "ddpm", "--dataset", "images.npy", "--out", "runs"], capsys,
            "1 NaN or infinite values")


def test_sft_data_that_is_not_text_is_refused(capsys, in_tmp):
    np.save(in_tmp / "file.npy", np.arange(300.0))
    refused(["train", "sft", "--data", "file.npy", "--out", "runs"], capsys, "not UTF-8")
    (in_tmp / "rows.jsonl").write_text("[1, 2]\n")
    refused(["train", "sft", "--data", "rows.jsonl", "--out", "runs"], capsys,
            "rows.jsonl:1", "not an object")


# --- damaged run folders -------------------------------------------------------------------------

@pytest.mark.parametrize("damage,words", [
    (lambda d: (d / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    (lambda d: (d / "config.json").write_text('{"config": {}}'), ["no 'method' entry"]),
    (lambda d: (d / "config.json").write_text("[1]"), ["holds a list"]),
    (lambda d: (d / "metrics.csv").write_text("step,loss\n1,abc\n"),
     ["metrics.csv is damaged (line 2)"]),
    (lambda d: (d / "metrics.csv").write_bytes(b"step,loss\n\xff\xfe,1\n"),
     ["metrics.csv is damaged"]),
])
def test_damaged_run_folders_are_one_line(damage, words, run_copy, capsys):
    damage(run_copy)
    for argv in (["sample", str(run_copy)], ["eval", str(run_copy)],
                 ["train", "--resume", str(run_copy)]):
        refused(argv, capsys, *words)


def test_a_recorded_value_of_the_wrong_type_names_config_json(run_copy, capsys):
    meta = read_json(run_copy / "config.json")
    meta["config"]["steps"] = "abc"
    write_json(run_copy / "config.json", meta)
    for argv in (["eval", str(run_copy)], ["train", "--resume", str(run_copy)]):
        refused(argv, capsys, "config.json", "--steps must be an integer", "'abc'")


def _rewrite_checkpoint(path, tensors=None, metadata=None):
    """Re-save a checkpoint with edited tensors or metadata and no checksums, as a program
    other than mlatlas would."""
    tensors = tensors if tensors is not None else load_tensors(path)
    metadata = metadata if metadata is not None else read_metadata(path)
    save_file(tensors, str(path), metadata=metadata)


def test_invalid_json_in_the_checkpoint_state_is_one_line(run_copy, capsys):
    path = run_copy / CHECKPOINT
    _rewrite_checkpoint(path, metadata={**read_metadata(path), "state": "{oops"})
    refused(["train", "--resume", str(run_copy)], capsys, "not valid JSON", CHECKPOINT)


@pytest.mark.parametrize("checksummed", [True, False])
def test_a_missing_generator_tensor_is_named(run_copy, capsys, checksummed):
    path = run_copy / CHECKPOINT
    tensors = load_tensors(path)
    del tensors["rng"]
    if checksummed:
        save_tensors(path, tensors, read_metadata(path))
        words = ["no tensor rng"]
    else:  # the tensor dropped, the checksums left as they were
        save_file(tensors, str(path), metadata={**read_metadata(path), **_checksum_keys(path)})
        words = ["tensor rng is missing"]
    refused(["train", "--resume", str(run_copy), "--steps", "4"], capsys, CHECKPOINT, *words)


def _checksum_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: v for k, v in f.metadata().items() if k.startswith("__")}


def test_a_flipped_bit_in_tensor_data_is_detected(run_copy, capsys):
    path = run_copy / CHECKPOINT
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor's bytes
    path.write_bytes(bytes(raw))
    for argv in (["sample", str(run_copy)], ["train", "--resume", str(run_copy)]):
        refused(argv, capsys, CHECKPOINT, "does not match its checksum")


def test_a_wrong_shape_names_the_tensor(run_copy, capsys):
    path = run_copy / CHECKPOINT
    tensors = load_tensors(path)
    name = next(k for k in tensors if k.startswith("ema.") and k.endswith("weight"))
    tensors[name] = torch.zeros(3, 3)
    save_tensors(path, tensors, read_metadata(path))
    refused(["sample", str(run_copy)], capsys, f"tensor {name} has shape (3, 3)")


def test_legacy_checkpoints_without_checksums_still_load(run_copy, capsys):
    path = run_copy / CHECKPOINT
    _rewrite_checkpoint(path)
    assert "__checksums__" not in _checksum_keys(path)
    code, _ = cli(["sample", str(run_copy), "--n", "4"], capsys)
    assert code == 0


def test_every_file_a_run_writes_has_the_same_mode(points_run):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in points_run.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert modes[CHECKPOINT] & 0o044  # readable by others as open() would make it


# --- leftovers -----------------------------------------------------------------------------------

def test_a_run_that_fails_during_start_up_leaves_no_folder(capsys, in_tmp, monkeypatch):
    from mlatlas.generative.diffusion import loop

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_model", broken)
    code, _ = cli(["train", "ddpm", "--out", "runs", *POINTS], capsys)
    assert code == 130
    assert list((in_tmp / "runs").iterdir()) == []


def test_resume_removes_stale_temporaries(run_copy, capsys):
    stale = run_copy / f".{CHECKPOINT}.abc123.tmp"
    stale.write_bytes(b"")  # what kill -9 during a checkpoint write leaves
    code, _ = cli(["train", "--resume", str(run_copy), "--steps", "3"], capsys)
    assert code == 0 and not stale.exists()


# --- strict JSON ---------------------------------------------------------------------------------

def test_json_is_strict_both_ways(tmp_path):
    with pytest.raises(NonFiniteError, match="eval/mmd is not a finite number"):
        write_json(tmp_path / "summary.json", {"eval/mmd": float("nan"), "eval/n": 3})
    assert not (tmp_path / "summary.json").exists()
    with pytest.raises(NonFiniteError, match=r"rows\[1\]/x"):
        write_json(tmp_path / "s.json", {"rows": [{"x": 1.0}, {"x": float("inf")}]})
    (tmp_path / "nan.json").write_text('{"a": NaN}')
    with pytest.raises(Exception, match="nan.json is not valid JSON: NaN is not JSON"):
        read_json(tmp_path / "nan.json")


def test_a_non_finite_metric_stops_eval_with_exit_1(points_run, capsys, monkeypatch):
    from mlatlas.generative.diffusion import loop

    monkeypatch.setattr(loop, "score_samples", lambda x, data: {"mmd": float("nan")})
    before = (points_run / "summary.json").read_text() if (
        points_run / "summary.json").exists() else None
    refused(["eval", str(points_run), "--n", "8"], capsys, "eval/mmd is not a finite number",
            code=1)
    after = (points_run / "summary.json").read_text() if (
        points_run / "summary.json").exists() else None
    assert after == before
    json.loads(after or "{}")


def test_config_from_dict_checks_types():
    with pytest.raises(ConfigError, match="--steps must be an integer"):
        config_from_dict(BaseConfig, {"steps": 2.5})
    with pytest.raises(ConfigError, match="--seed must be an integer"):
        config_from_dict(BaseConfig, {"seed": True})


def test_checkpoint_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_tensors(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"__checksums__": "{}"})


def test_run_open_of_a_missing_folder(tmp_path):
    from mlatlas.core.run import RunError

    with pytest.raises(RunError, match="not a run folder"):
        Run.open(tmp_path / "nothing")


def test_an_infinite_default_is_recorded_as_strict_json_and_reads_back(tmp_path):
    from mlatlas.rl.deep.ppo import Config

    run = Run.create("ppo", Config(), root=tmp_path)
    text = (run.dir / "config.json").read_text()
    assert '"target_return": "inf"' in text and "Infinity" not in text
    assert run.load_config(Config).target_return == float("inf")
    # config.json of a run made before strict JSON: Infinity still reads, NaN does not.
    (run.dir / "config.json").write_text(text.replace('"inf"', "Infinity"))
    assert Run.open(run.dir).load_config(Config).target_return == float("inf")
    (run.dir / "config.json").write_text(text.replace('"inf"', "NaN"))
    with pytest.raises(Exception, match="NaN is not JSON"):
        Run.open(run.dir)
