"""Runs: the folder a training job writes, and the loop that checkpoints and resumes it.

A run lives in ``runs/<method>-<timestamp>/``:

- ``config.json``: the method's name and its full config;
- ``metrics.csv``: one row per logged step (``step``, the method's metrics, ``wall_s``);
- ``checkpoint.safetensors``: every tensor needed to continue (model, EMA, optimizer moments,
  generator states), with the step and the remaining JSON state in its metadata;
  ``checkpoint.json`` is a readable copy of that state (step, optimizer hyper-parameters, RNG);
- figures as PNG and ``summary.json`` with the final metrics.

:func:`fit` runs a method's step function for ``total_steps`` steps. It restores the latest
checkpoint first, so a run stopped at step k and resumed ends bitwise equal to an uninterrupted one
(all randomness flows through checkpointed generators; batch order is a function of seed and epoch).
A non-finite metric stops the run at once, before anything is saved over the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from mlatlas.core import distributed
from mlatlas.core.config import config_from_dict, config_to_dict
from mlatlas.core.io import (
    CheckpointError,
    FileError,
    atomic_path,
    load_tensors,
    loads_json,
    read_json,
    read_metadata,
    remove_stale_temporaries,
    save_tensors,
    write_json,
    write_text,
)
from mlatlas.core.progress import progress_bar

CHECKPOINT = "checkpoint.safetensors"
# summary.json's keys: what training did or used, the last evaluation of the trained model, and
# the same evaluation of the reference it is compared with.
SUMMARY_PREFIXES = ("train/", "eval/", "baseline/")


class RunError(FileError):
    """A run folder that cannot be used (missing, not a run, damaged, incompatible)."""


class NonFiniteLossError(RuntimeError):
    def __init__(self, run: Run, step: int, name: str, value: float, last_good: int | None):
        self.step, self.name, self.value, self.last_good = step, name, value, last_good
        kept = (f"the last good checkpoint (step {last_good}) is kept in {run.dir}"
                if last_good is not None else "no checkpoint had been written")
        super().__init__(f"{name} became {value} at step {step}; stopped, {kept}")


class DivergedRun(RuntimeError):
    """A run stopped by its method's divergence check (e.g. a GAN's discriminator loss pinned
    at zero): the reason, the step, and which checkpoint is kept."""

    def __init__(self, run: Run, step: int, reason: str, last_good: int | None):
        self.step, self.reason, self.last_good = step, reason, last_good
        kept = (f"the last good checkpoint (step {last_good}) is kept in {run.dir}"
                if last_good is not None else "no checkpoint had been written")
        super().__init__(f"diverged at step {step}: {reason}; stopped, {kept}")


class InterruptedRun(RuntimeError):
    def __init__(self, run: Run, step: int):
        self.step = step
        super().__init__(f"interrupted at step {step}; checkpoint saved; "
                         f"continue with: mlatlas train --resume {run.dir}")


@dataclass
class Run:
    """A run folder and its config; the single place that knows the file layout."""

    dir: Path
    method: str
    config: dict[str, Any]
    config_class: str | None = None
    """``module:Class`` of the config, so a run folder names the code that reads it."""
    _rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _columns: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, method: str, config: Any, root: str | Path = "runs") -> Run:
        """A new run folder. In a data-parallel job every rank calls it; rank 0 makes the
        folder and the others learn its name."""
        if not distributed.is_main():
            return cls(Path(distributed.broadcast_object(None)), method, config_to_dict(config),
                       config_class=f"{type(config).__module__}:{type(config).__qualname__}")
        run = cls._create(method, config, root)
        distributed.broadcast_object(str(run.dir))
        return run

    @classmethod
    def _create(cls, method: str, config: Any, root: str | Path) -> Run:
        root = Path(root)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        directory = root / f"{method}-{stamp}"
        suffix = 1
        try:
            root.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    directory.mkdir()
                    break
                except FileExistsError:
                    suffix += 1
                    directory = root / f"{method}-{stamp}-{suffix}"
        except OSError as err:
            raise RunError(f"cannot make a run folder in {root}: "
                           f"{err.strerror or err}") from None
        run = cls(directory, method, config_to_dict(config),
                  config_class=f"{type(config).__module__}:{type(config).__qualname__}")
        run.write_config()
        return run

    @classmethod
    def open(cls, directory: str | Path) -> Run:
        """The run in ``directory``, its config.json and metrics.csv checked: a damaged folder
        is a RunError naming the file and what is wrong, never a traceback."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise RunError(f"{directory} is not a run folder (no config.json)")
        path = directory / "config.json"
        meta = read_json(path)
        if not isinstance(meta, dict):
            raise RunError(f"{path} holds a {type(meta).__name__}, not a run's record")
        for key, kind in (("method", str), ("config", dict)):
            if not isinstance(meta.get(key), kind):
                problem = "has no" if key not in meta else "has a malformed"
                raise RunError(f"{path} {problem} {key!r} entry; it is not a run's record")
        if not isinstance(meta.get("config_class"), str | None):
            raise RunError(f"{path} has a malformed 'config_class' entry")
        run = cls(directory, meta["method"], meta["config"], meta.get("config_class"))
        run._rows = run.read_metrics()
        return run

    def path(self, name: str) -> Path:
        return self.dir / name

    def load_config(self, cls: type | None = None) -> Any:
        """The run's config object, of ``cls`` or else of the class ``config.json`` records, so
        a method module rebuilds its config without knowing the registry."""
        if cls is None:
            if not self.config_class:
                raise RunError(f"{self.dir}/config.json names no config class (a run made "
                               "before mlatlas 0.2); load it with its method's Config")
            module, _, name = self.config_class.partition(":")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                raise RunError(f"{self.dir} was made by {self.config_class}, which this "
                               "version of mlatlas does not have") from None
        from mlatlas.core.config import ConfigError

        try:
            return config_from_dict(cls, self.config)
        except ConfigError as err:
            raise RunError(f"{self.path('config.json')}: {err}") from None

    def write_config(self) -> None:
        import mlatlas

        if not distributed.is_main():
            return
        write_json(self.path("config.json"), {"method": self.method,
                                              "config_class": self.config_class,
                                              "config": self.config,
                                              "mlatlas_version": mlatlas.__version__})

    # metrics -----------------------------------------------------------------------------------
    def log(self, row: Mapping[str, Any]) -> None:
        self._rows.append(dict(row))
        if not distributed.is_main():
            return
        path = self.path("metrics.csv")
        if self._columns and list(row) == self._columns and path.is_file():
            # Same columns as the file: append one line (a single write) instead of rewriting
            # the whole file, which made long runs logged often quadratic in their length.
            buffer = io.StringIO()
            csv.DictWriter(buffer, fieldnames=self._columns).writerow(row)
            with path.open("a", newline="") as f:
                f.write(buffer.getvalue())
        else:
            self._write_metrics()

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path("metrics.csv")
        if not path.is_file():
            return []
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                # A metric logged only on some rows leaves empty cells on the others.
                rows = [{k: int(v) if k == "step" else float(v) for k, v in row.items()
                         if v != ""} for row in reader]
                columns = reader.fieldnames
            except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as err:
                raise RunError(f"{path} is damaged (line {reader.line_num}): "
                               f"{str(err).splitlines()[0]}") from None
        if columns is not None and "step" not in columns:
            raise RunError(f"{path} is damaged: it has no 'step' column")
        if any("step" not in row for row in rows):
            raise RunError(f"{path} is damaged: a row has no step")
        return rows

    def _write_metrics(self) -> None:
        columns: list[str] = []
        for row in self._rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self._rows)
        write_text(self.path("metrics.csv"), buffer.getvalue())
        self._columns = columns

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (they will be logged again by the resumed run)."""
        self._rows = [r for r in self._rows if r["step"] <= step]
        if distributed.is_main():
            self._write_metrics()

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def last_row(self) -> dict[str, Any]:
        """The last logged row; a RunError when there is none after training (metrics.csv was
        deleted or emptied, and a resumed run cannot log its past again)."""
        if not self._rows:
            raise RunError(f"{self.path('metrics.csv')} holds no rows: it was deleted or "
                           "emptied after the steps it logged")
        return self._rows[-1]

    # outputs -----------------------------------------------------------------------------------
    def save_figure(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.path(name)
        if distributed.is_main():
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    def write_summary(self, summary: Mapping[str, Any], replace: str | None = None) -> Path:
        """Merge flat ``train/``, ``eval/`` or ``baseline/`` keys into summary.json (the family
        contract; any other key, or a nested value, is a programming error). With ``replace``,
        the keys already there under that prefix go first, in the same atomic write."""
        for key, value in summary.items():
            if not key.startswith(SUMMARY_PREFIXES):
                raise ValueError(f"summary key {key!r} needs a prefix: "
                                 f"{', '.join(SUMMARY_PREFIXES)} (docs/architecture.md)")
            if isinstance(value, Mapping):
                raise ValueError(f"summary key {key!r} holds a mapping; summary.json is flat")
        old = self.summary()
        if replace is not None:
            old = {k: v for k, v in old.items() if not k.startswith(replace)}
        path = self.path("summary.json")
        if distributed.is_main():
            write_json(path, {**old, **summary})
        return path

    def write_evaluation(self, metrics: Mapping[str, Any], prefix: str = "eval") -> Path:
        """``metrics`` as ``<prefix>/<name>`` keys, replacing every key an earlier evaluation
        wrote under that prefix, so summary.json never mixes two evaluations."""
        return self.write_summary({f"{prefix}/{name}": value for name, value in metrics.items()},
                                  replace=f"{prefix}/")

    def summary(self) -> dict[str, Any]:
        path = self.path("summary.json")
        return read_json(path) if path.is_file() else {}

    # checkpoints -------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return self.path(CHECKPOINT).is_file()

    def save_checkpoint(self, objects: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Write every object's state (rank 0 of a data-parallel job alone: all ranks hold the
        same state)."""
        if not distributed.is_main():
            return
        tensors, object_state = flatten_state(objects)
        state = {**state, "objects": object_state}
        text = json.dumps(state, sort_keys=True, allow_nan=False)
        # The safetensors metadata is the authoritative copy (one atomic file); the JSON beside
        # it is for people to read.
        save_tensors(self.path(CHECKPOINT), tensors,
                     metadata={"method": self.method, "state": text})
        write_json(self.path("checkpoint.json"), state)

    def _checkpoint_state(self) -> dict[str, Any]:
        path = self.path(CHECKPOINT)
        metadata = read_metadata(path)
        if metadata.get("method") != self.method or "state" not in metadata:
            raise CheckpointError(f"{path} was not written by a {self.method} run")
        state = loads_json(metadata["state"], f"{path}: the state in its metadata")
        for key, kind in (("step", int), ("objects", dict)):
            if not isinstance(state, dict) or not isinstance(state.get(key), kind):
                raise CheckpointError(f"{path} is corrupt: its state has no valid {key!r}")
        if state["step"] < 0:
            raise CheckpointError(f"{path} is corrupt: step {state['step']}")
        return state

    def checkpoint_step(self) -> int | None:
        return self._checkpoint_state()["step"] if self.has_checkpoint() else None

    def verify_checkpoint(self) -> None:
        """CheckpointError unless every checksum of the checkpoint holds."""
        load_tensors(self.path(CHECKPOINT))

    def load_checkpoint(self, objects: Mapping[str, Any]) -> dict[str, Any]:
        state = self._checkpoint_state()
        path = self.path(CHECKPOINT)
        try:
            restore_state(objects, load_tensors(path), state.pop("objects"))
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        return state

    def load_weights(self, module: torch.nn.Module, name: str = "model") -> None:
        """Load only one module's weights (e.g. the EMA model for sampling)."""
        path = self.path(CHECKPOINT)
        try:
            restore_state({name: module}, load_tensors(path), {})
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None


def nested_run(directory: Path, method: str, config: dict[str, Any],
               config_class: str | None) -> Run:
    """The run folder ``directory`` inside a run (a stage trained first: LiT's image tower,
    BLIP's CapFilt stage, the autoencoder of a two-stage generative model): opened when it
    exists, else made for ``config``. Rank 0 looks (before it writes), so every rank of a
    data-parallel job gets the same answer."""
    if distributed.broadcast_object((directory / "config.json").is_file()):
        return Run.open(directory)
    directory.mkdir(parents=True, exist_ok=True)
    nested = Run(directory, method, config, config_class=config_class)
    nested.write_config()
    return nested


def prefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``metrics`` with every key behind ``prefix`` (``"base/"``, ``"reconstruction_"``)."""
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def open_stage(directory: str | Path, option: str, methods: Collection[str], dataset: str,
               purpose: str) -> Run:
    """The finished run in ``directory`` that another is built on (an autoencoder under a
    prior or latent diffusion, a latent diffusion model under ControlNet): of one of
    ``methods``, with a checkpoint, trained on ``dataset``; a ConfigError naming ``option``
    and saying what the run is needed for (``purpose``) otherwise."""
    from mlatlas.core.config import ConfigError

    try:
        source = Run.open(directory)
    except RunError as err:
        raise ConfigError(f"{option}: {err}") from None
    if source.method not in methods:
        raise ConfigError(f"{option}: {directory} is a {source.method} run; {purpose} a "
                          f"{' or '.join(methods)} run")
    if not source.has_checkpoint():
        raise ConfigError(f"{option}: {directory} has no checkpoint")
    if source.config.get("dataset") != dataset:
        raise ConfigError(f"{option}: {directory} was trained on "
                          f"{source.config.get('dataset')!r}, this run on {dataset!r}")
    return source


def train_stage(directory: Path, cfg: Any, module: Any, progress: bool | None = None) -> Run:
    """The run of ``cfg`` (``module.train`` trains it) in the folder ``directory`` nested inside
    another run: trained, resumed, or found finished. Rank 0 decides, so every rank trains or
    none does."""
    nested = nested_run(directory, cfg.METHOD, config_to_dict(cfg),
                        f"{module.__name__}:{type(cfg).__qualname__}")
    if distributed.broadcast_object(nested.checkpoint_step() != cfg.steps
                                    or not nested.summary()):
        module.train(nested.load_config(type(cfg)), nested, progress)
        distributed.barrier()  # the other ranks read the stage rank 0 has just written
    return nested


def flatten_state(objects: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split modules, optimizers and generators into named tensors plus JSON-able state."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            tensors.update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
        elif isinstance(obj, torch.optim.Optimizer):
            sd = obj.state_dict()
            scalars: dict[str, dict[str, Any]] = {}
            for idx, slots in sd["state"].items():
                for key, value in slots.items():
                    if torch.is_tensor(value):
                        tensors[f"{name}.state.{idx}.{key}"] = value
                    else:
                        scalars.setdefault(str(idx), {})[key] = value
            state[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
        elif isinstance(obj, torch.Generator):
            tensors[name] = obj.get_state()
        elif isinstance(obj, dict):
            tensors.update({f"{name}.{k}": v for k, v in obj.items()})
        else:
            raise TypeError(f"cannot checkpoint {name!r} of type {type(obj).__name__}")
    return tensors, state


def restore_state(objects: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                  state: dict[str, Any]) -> None:
    """Load ``tensors`` and ``state`` (from :func:`flatten_state`) into ``objects``; a missing,
    unexpected or misshapen tensor is a CheckpointError naming it."""
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            prefix = f"{name}."
            found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            _check_fits(name, obj.state_dict(), found)
            try:
                obj.load_state_dict(found)
            except (RuntimeError, KeyError, ValueError) as err:
                raise CheckpointError(f"checkpoint does not fit {name}: "
                                      f"{str(err).splitlines()[0]}") from None
        elif isinstance(obj, torch.optim.Optimizer):
            _restore_optimizer(name, obj, tensors, state)
        elif isinstance(obj, torch.Generator):
            if name not in tensors:
                raise CheckpointError(f"checkpoint has no tensor {name} (a generator state)")
            try:
                obj.set_state(tensors[name])
            except (RuntimeError, TypeError) as err:
                raise CheckpointError(f"tensor {name} is not a generator state: "
                                      f"{str(err).splitlines()[0]}") from None
        elif isinstance(obj, dict):
            # Tables (e.g. q[s, a]) are replaced in place, so the caller's dict sees them.
            # Their shapes may differ: a history preallocated for more steps grows on resume.
            found = {k: tensors[f"{name}.{k}"] for k in obj if f"{name}.{k}" in tensors}
            _check_fits(name, obj, found, shapes=False)
            obj.update(found)


def _check_fits(name: str, expected: Mapping[str, Any], found: Mapping[str, torch.Tensor],
                shapes: bool = True) -> None:
    for key, value in expected.items():
        if key not in found:
            raise CheckpointError(f"checkpoint has no tensor {name}.{key}")
        if shapes and torch.is_tensor(value) and found[key].shape != value.shape:
            raise CheckpointError(f"tensor {name}.{key} has shape {tuple(found[key].shape)} in "
                                  f"the checkpoint, {tuple(value.shape)} in the model")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint tensor {name}.{extra[0]} has no place in the model")


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    if not isinstance(state.get(name), dict) or not {"scalars", "param_groups"} <= set(
            state[name]):
        raise CheckpointError(f"checkpoint has no state for the optimizer {name}")
    prefix = f"{name}.state."
    slots: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, slot = key[len(prefix):].split(".", 1)
                slots.setdefault(int(idx), {})[slot] = value
        for idx, scalars in state[name]["scalars"].items():
            slots.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": slots, "param_groups": state[name]["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint state does not fit the optimizer {name}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                              ) from None


StepFn = Callable[[int], Mapping[str, Any]]


def fit(run: Run, step_fn: StepFn, *, total_steps: int, objects: Mapping[str, Any],
        log_every: int, ckpt_every: int, progress: bool | None = None,
        until: Callable[[Mapping[str, float]], bool] | None = None,
        diverged: Callable[[Mapping[str, float]], str | None] | None = None,
        latest: Collection[str] = (), step_size: int = 1) -> int:
    """Call ``step_fn(step)`` for steps 1..total_steps, resuming from the run's checkpoint.

    ``step_fn`` does one optimisation step and returns its metrics (floats or 0-d tensors);
    ``objects`` names everything whose state must survive a restart: modules, optimizers,
    generators, and dicts of tensors (updated in place on restore). Logged rows hold the mean
    of each metric over the steps since the previous row, except those named in ``latest``
    (counters, running averages), which are logged as their last value. ``until(metrics)``
    returning True ends
    the run early after that step (an iterative solver that has converged); ``diverged(metrics)``
    returning a reason stops it with :class:`DivergedRun` before that step is saved, so the last
    good checkpoint stays (both see the metrics averaged over ranks, so every rank agrees).
    ``step_size`` is how many units of ``step`` one call covers (deep RL counts environment
    steps, many per update): ``step_fn`` sees step_size, 2 step_size, ..., and ``total_steps``,
    ``log_every`` and ``ckpt_every`` must be multiples of it. Returns the last step done.

    In a data-parallel job every rank calls ``fit`` with its shard of each batch: the logged
    metrics are the means over ranks, and rank 0 alone writes rows and checkpoints.
    """
    for name, value in (("total_steps", total_steps), ("log_every", log_every),
                        ("ckpt_every", ckpt_every)):
        if value % step_size:
            raise ValueError(f"{name} {value} is not a multiple of the step size {step_size}")
    if "model" not in objects:
        raise ValueError(f"fit needs what it trains under 'model' (the family contract's "
                         f"checkpoint groups), got {sorted(objects)}")
    # The global torch RNG (dropout, init of lazily built parts) is checkpointed too.
    objects = {**objects, "rng_torch": _GlobalTorchRng()}
    start, window, elapsed = 0, {}, 0.0
    # Rank 0 decides, so no rank sees the step-0 checkpoint rank 0 is about to write.
    resumed = distributed.broadcast_object(run.has_checkpoint())
    if resumed:
        if distributed.is_main():
            remove_stale_temporaries(run.dir)  # left by a process killed mid-write
        state = run.load_checkpoint(objects)
        start, window, elapsed = state["step"], state["window"], state["elapsed"]
        if start > total_steps:
            raise RunError(f"{run.dir} is already at step {start}, past {total_steps} steps")
        run.truncate_metrics(start)
    last_good = start if resumed else None

    def save(step: int) -> None:
        nonlocal last_good
        run.save_checkpoint(objects, {"step": step, "window": window,
                                      "elapsed": elapsed + time.perf_counter() - t0,
                                      "world_size": distributed.world_size()})
        last_good = step

    t0 = time.perf_counter()
    if last_good is None:
        save(0)
    step = start
    bar = progress_bar(total=total_steps, initial=start, desc=run.method,
                       progress=progress if distributed.is_main() else False)
    # Ctrl-C sets a flag that is read between steps, so a run never stops halfway through an
    # optimizer update and the checkpoint it leaves is a consistent one.
    with _stop_on_sigint() as stop:
        try:
            for step in range(start + step_size, total_steps + 1, step_size):
                metrics, stopping = _reduce(step_fn(step), stop.is_set())
                for name, value in metrics.items():
                    if not math.isfinite(value):
                        raise NonFiniteLossError(run, step, name, value, last_good)
                    total, count = (0.0, 0) if name in latest else window.get(name, (0.0, 0))
                    window[name] = (total + value, count + 1)
                reason = diverged(metrics) if diverged is not None else None
                if reason:
                    raise DivergedRun(run, step, reason, last_good)
                done = until is not None and until(metrics)
                if step % log_every == 0 or step == total_steps or done:
                    row = {"step": step, **{k: t / c for k, (t, c) in window.items()},
                           "wall_s": round(elapsed + time.perf_counter() - t0, 3)}
                    run.log(row)
                    window = {}
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                                     if k not in ("step", "wall_s")})
                bar.update(step_size)
                if step % ckpt_every == 0 or step == total_steps or stopping or done:
                    save(step)
                if stopping:
                    raise InterruptedRun(run, step)
                if done:
                    break
        finally:
            bar.close()
    return step


def _reduce(metrics: Mapping[str, Any], stop: bool) -> tuple[dict[str, float], bool]:
    """The step's metrics averaged over the ranks of a data-parallel job, and whether any rank
    was asked to stop: one small all-reduce, so every rank logs, stops on a non-finite value
    and saves at the same step."""
    if not distributed.active():
        return {k: float(v) for k, v in metrics.items()}, stop
    values = torch.tensor([*(float(v) for v in metrics.values()), float(stop)],
                          dtype=torch.float64)
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    values = distributed.all_reduce_mean(values.to(device)).tolist()
    return dict(zip(metrics, values[:-1], strict=True)), values[-1] > 0


@contextlib.contextmanager
def _stop_on_sigint():
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    def request_stop(*_):
        # The first Ctrl-C asks for a clean stop; a second one interrupts at once.
        stop.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _GlobalTorchRng(torch.nn.Module):
    """Adapter that checkpoints ``torch.get_rng_state()`` like a module buffer."""

    def state_dict(self, *args, **kwargs):
        return {"state": torch.get_rng_state()}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        torch.set_rng_state(state_dict["state"])
