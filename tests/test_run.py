import json
import os
import signal

import pytest
import torch

from mlatlas.core.config import BaseConfig
from mlatlas.core.io import CheckpointError, atomic_path, load_tensors
from mlatlas.core.run import InterruptedRun, NonFiniteLossError, Run, RunError, fit
from mlatlas.generative.diffusion import configs, loop


def make_run(runs, steps=40, **kw):
    cfg = configs.DDPMConfig(dataset="8gaussians", steps=steps, batch_size=64, log_every=5,
                      ckpt_every=10, eval_samples=0, hidden=32, **kw)
    return cfg, Run.create("ddpm", cfg, root=runs)


def params(run, name="model"):
    return {k: v for k, v in load_tensors(run.path("checkpoint.safetensors")).items()
            if k.startswith(name + ".")}


def test_run_folder_layout(runs):
    cfg, run = make_run(runs, steps=20)
    loop.train(cfg, run, progress=False)
    for name in ("config.json", "metrics.csv", "checkpoint.safetensors", "checkpoint.json",
                 "loss.png", "summary.json"):
        assert run.path(name).is_file(), name
    assert json.loads(run.path("config.json").read_text())["config"]["steps"] == 20
    state = json.loads(run.path("checkpoint.json").read_text())
    assert state["step"] == 20 and "optimizer" in state["objects"]
    assert [r["step"] for r in run.metrics] == [5, 10, 15, 20]
    assert not [p for p in run.dir.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_metrics(runs):
    rows = []
    for _ in range(2):
        cfg, run = make_run(runs, steps=20)
        loop.train(cfg, run, progress=False)
        rows.append([{k: v for k, v in r.items() if k != "wall_s"} for r in run.metrics])
    assert rows[0] == rows[1]
    cfg, run = make_run(runs, steps=20, seed=1)
    loop.train(cfg, run, progress=False)
    assert [r["loss"] for r in run.metrics] != [r["loss"] for r in rows[0]]


def test_resume_is_exact(runs, monkeypatch):
    cfg, full = make_run(runs, steps=40)
    loop.train(cfg, full, progress=False)

    cfg, part = make_run(runs, steps=40)
    real_fit = loop.fit

    def stop_at_23(run, step_fn, **kw):
        def step(i):
            if i == 23:
                os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C
            return step_fn(i)
        return real_fit(run, step, **kw)

    monkeypatch.setattr(loop, "fit", stop_at_23)
    with pytest.raises(InterruptedRun) as stop:
        loop.train(cfg, part, progress=False)
    assert stop.value.step == 23
    assert json.loads(part.path("checkpoint.json").read_text())["step"] == 23
    monkeypatch.setattr(loop, "fit", real_fit)
    loop.train(cfg, Run.open(part.dir), progress=False)

    for name in ("model", "ema", "optimizer"):
        a, b = params(full, name), params(part, name)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in full.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"}
                     for r in Run.open(part.dir).metrics]


def test_resume_from_periodic_checkpoint_drops_later_rows(runs):
    """A hard kill after step 25 leaves the step-20 checkpoint and rows up to 25."""
    cfg, run = make_run(runs, steps=20)
    loop.train(cfg, run, progress=False)
    run.log({"step": 25, "loss": 9.0, "wall_s": 0.0})  # a row the crash left behind
    cfg40 = configs.DDPMConfig(**{**run.config, "steps": 40})
    loop.train(cfg40, Run.open(run.dir), progress=False)
    steps = [r["step"] for r in Run.open(run.dir).metrics]
    assert steps == list(range(5, 45, 5))


def test_non_finite_loss_stops_and_keeps_last_good(runs):
    cfg, run = make_run(runs, steps=40)
    calls = []

    def step_fn(step):
        calls.append(step)
        return {"loss": float("nan") if step == 17 else 1.0}

    model = torch.nn.Linear(2, 2)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 17") as err:
        fit(run, step_fn, total_steps=40, objects={"model": model}, log_every=5,
            ckpt_every=10, progress=False)
    assert err.value.last_good == 10 and calls[-1] == 17
    assert json.loads(run.path("checkpoint.json").read_text())["step"] == 10


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_corrupt_checkpoint_is_a_clear_error(runs):
    cfg, run = make_run(runs, steps=10)
    loop.train(cfg, run, progress=False)
    run.path("checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        loop.sample(run, 4)


def test_optimizer_and_generator_round_trip(runs):
    _, run = make_run(runs)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.randn(1, generator=gen)  # advance past the seed state
    run.save_checkpoint({"model": model, "opt": opt, "rng": gen}, {"step": 1})
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    gen2 = torch.Generator()
    assert run.load_checkpoint({"model": model2, "opt": opt2, "rng": gen2})["step"] == 1
    assert torch.equal(model.weight, model2.weight)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt.state[model.weight]["exp_avg"], opt2.state[model2.weight]["exp_avg"])
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=gen2))


def test_metrics_with_sparse_columns_round_trip(runs):
    _, run = make_run(runs)
    run.log({"step": 1, "loss": 0.5})
    run.log({"step": 2, "loss": 0.25, "mmd": 0.1})
    run.log({"step": 3, "loss": 0.125, "mmd": 0.05})  # appended
    assert Run.open(run.dir).metrics == [{"step": 1, "loss": 0.5},
                                         {"step": 2, "loss": 0.25, "mmd": 0.1},
                                         {"step": 3, "loss": 0.125, "mmd": 0.05}]
    reopened = Run.open(run.dir)
    reopened.log({"step": 4, "loss": 0.0625, "mmd": 0.025})
    assert (run.dir / "metrics.csv").read_text().splitlines() == [
        "step,loss,mmd", "1,0.5,", "2,0.25,0.1", "3,0.125,0.05", "4,0.0625,0.025"]


def test_checkpoint_that_does_not_fit_the_model_is_a_clear_error(runs):
    cfg, run = make_run(runs, steps=5)
    loop.train(cfg, run, progress=False)
    run.config["hidden"] = 64  # as if config.json had been edited by hand
    with pytest.raises(CheckpointError, match=r"tensor ema\.net\.0\.weight has shape "
                       r"\(32, 66\) in the checkpoint, \(64, 66\) in the model"):
        loop.sample(run, 4)


def test_tensor_dicts_round_trip_and_until_stops_early(runs):
    run = Run.create("toy", BaseConfig(), root=runs)
    tables = {"v": torch.zeros(3)}

    def step(k):
        tables["v"] = tables["v"] + 1
        return {"left": 5 - k}

    last = fit(run, step, total_steps=100, objects={"model": tables}, log_every=10,
               ckpt_every=50, until=lambda m: m["left"] <= 0)
    assert last == 5 and tables["v"].tolist() == [5.0, 5.0, 5.0]
    assert run.checkpoint_step() == 5 and run.metrics[-1]["step"] == 5
    restored = {"v": torch.empty(3)}
    run.load_checkpoint({"model": restored})
    assert restored["v"].tolist() == [5.0, 5.0, 5.0]
    with pytest.raises(CheckpointError, match="checkpoint has no tensor model.w"):
        run.load_checkpoint({"model": {"w": torch.zeros(1)}})


def test_summary_keys_follow_the_contract_and_an_evaluation_replaces_the_last(tmp_path):
    run = Run.create("ddpm", configs.DDPMConfig(), tmp_path)
    run.write_summary({"train/steps": 3})
    with pytest.raises(ValueError, match="needs a prefix"):
        run.write_summary({"final_loss": 1.0})
    with pytest.raises(ValueError, match="flat"):
        run.write_summary({"eval/scores": {"mmd": 1.0}})
    run.write_evaluation({"mmd": 0.5, "label_accuracy": 0.9})
    run.write_evaluation({"mmd": 0.4})
    assert run.summary() == {"train/steps": 3, "eval/mmd": 0.4}
    run.write_evaluation({"mmd": 0.7}, prefix="baseline")
    assert run.summary()["baseline/mmd"] == 0.7 and run.summary()["eval/mmd"] == 0.4


def test_fit_needs_a_model_group(tmp_path):
    run = Run.create("ddpm", configs.DDPMConfig(), tmp_path)
    with pytest.raises(ValueError, match="'model'"):
        fit(run, lambda step: {}, total_steps=1, objects={"net": torch.nn.Linear(1, 1)},
            log_every=1, ckpt_every=1)


def test_config_json_names_the_config_class_and_load_config_rebuilds_it(tmp_path):
    cfg = configs.DDPMConfig(steps=7)
    run = Run.open(Run.create("ddpm", cfg, tmp_path).dir)
    assert run.config_class == "mlatlas.generative.diffusion.configs:DDPMConfig"
    assert run.load_config() == cfg


def test_a_run_of_0_1_without_a_config_class_still_loads_its_diffusion_config(tmp_path):
    cfg = configs.EDMConfig(steps=5)
    run = Run.create("edm", cfg, tmp_path)
    meta = json.loads(run.path("config.json").read_text())
    del meta["config_class"]
    run.path("config.json").write_text(json.dumps(meta))
    old = Run.open(run.dir)
    with pytest.raises(RunError, match="names no config class"):
        old.load_config()
    assert loop.load_config(old) == cfg
