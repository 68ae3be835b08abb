import json
import subprocess
import sys

import pytest
import torch

from mlatlas.cli import main
from mlatlas.core.run import Run

FAST = ["--dataset", "8gaussians", "--batch-size", "64", "--hidden", "32", "--log-every", "5",
        "--ckpt-every", "10", "--eval-samples", "50", "--no-progress"]


def run_dir(runs):
    (path,) = runs.iterdir()
    return path


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ddpm" in out and "generative/diffusion" in out and "8gaussians" in out


@pytest.mark.parametrize("argv,message", [
    (["trian"], "unknown command 'trian'; did you mean train?"),
    (["train", "dpm"], "unknown method 'dpm'; did you mean ddpm or edm or dpo?"),
    (["train", "ddpm", "--dataset", "8gausians"], "did you mean 8gaussians"),
    (["train", "ddpm", "--stepz", "3"], "unrecognised argument '--stepz'; did you mean --steps"),
    (["train", "ddpm", "--steps", "abc"], "invalid int value: 'abc'"),
    (["train", "ddpm", "--steps", "0"], "--steps must be in 1..10^12, got 0"),
    (["train", "ddpm", "--variance", "bet"],
     "--variance must be one of posterior, beta, got 'bet'; did you mean beta?"),
    (["train", "ddpm", "--device", "cuda:7"], "CUDA is not available"),
    (["train"], "train needs a METHOD or --resume RUN_DIR"),
    (["sample", "/no/such/run"], "is not a run folder"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or argv[0] != "train"


def test_the_installed_command_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "mlatlas.cli", "train", "ddpm", "--lr", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("mlatlas train: error: argument --lr: invalid float value: "
                                   "'x'")


def test_train_sample_eval_resume(runs, capsys):
    assert main(["train", "ddpm", "--steps", "20", "--out", str(runs), *FAST]) == 0
    path = run_dir(runs)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["train/steps"] == 20 and summary["eval/n_samples"] == 50
    assert (path / "samples.png").is_file() and (path / "loss.png").is_file()

    assert main(["train", "--resume", str(path), "--steps", "30", "--no-progress"]) == 0
    assert Run.open(path).metrics[-1]["step"] == 30
    assert json.loads((path / "config.json").read_text())["config"]["steps"] == 30

    assert main(["train", "--resume", str(path), "--lr", "0.5"]) == 2
    assert "--lr cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", str(path), "--steps", "10"]) == 2
    assert "--steps 10 is below the step 30" in capsys.readouterr().err
    assert json.loads((path / "config.json").read_text())["config"]["steps"] == 30

    assert main(["sample", str(path), "--n", "16", "--no-progress"]) == 0
    assert (path / "samples-n16-seed0.npy").is_file()
    assert (path / "samples-n16-seed0.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(path), "--n", "100", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["mmd"] > 0
    assert json.loads((path / "summary.json").read_text())["eval/n_samples"] == 100


def test_nan_loss_exits_nonzero_naming_the_step(runs, capsys):
    code = main(["train", "ddpm", "--steps", "40", "--lr", "1e30", "--grad-clip", "0",
                 "--warmup-steps", "0", "--out", str(runs), *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert "became nan at step" in err or "became inf at step" in err
    assert "the last good checkpoint (step" in err
    state = json.loads((run_dir(runs) / "checkpoint.json").read_text())
    assert state["step"] % 10 == 0


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "ddpm", "--steps", "2", "--out", str(blocker / "runs"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Not a directory" in err
    assert main(["train", "ddpm", "--steps", "2", "--out", str(blocker), *FAST]) == 2
    assert "is a file; it must be a folder" in capsys.readouterr().err


def test_demo_takes_the_idle_cores_and_says_what_to_look_at(runs, capsys, monkeypatch):
    import mlatlas.cli as cli
    from mlatlas.core import runtime

    seen = {}
    train = cli.cmd_train

    def tiny_train(argv):  # the demo's own command, on a budget of seconds
        seen["argv"] = argv
        return train([*argv, "--steps", "2", "--channels", "8", "--eval-samples", "10",
                      "--no-progress"])

    monkeypatch.setattr(cli, "cmd_train", tiny_train)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert main(["demo", "--out", str(runs)]) == 0
    assert seen["argv"][seen["argv"].index("--threads") + 1] == "1"  # 4 cores, 3 busy
    out = capsys.readouterr().out
    assert "What to look at" in out and "samples.png" in out
    assert "frechet_distance" in out and "real digits" in out


def test_idle_cores_count_the_load_and_keep_one():
    from mlatlas.core import runtime

    cores = runtime.os.cpu_count()
    assert 1 <= runtime.idle_cores() <= cores


def test_dry_run_prints_the_config_and_makes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "ddpm", "--steps", "3", "--dataset", "two-moons", "--out", str(out),
                 "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["steps"] == 3 and config["dataset"] == "two-moons"
    assert not out.exists()
    assert main(["train", "ddpm", "--dataset", "no-such-data", "--dry-run"]) == 2
