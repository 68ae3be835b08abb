"""Resume tests of the contrastive methods: crash a run at a chosen call of its learning-rate
schedule (as if the process were killed there, after the last checkpoint), then compare runs."""

import torch

from mlatlas.core.io import load_tensors


def crash_at(monkeypatch, module, call: int) -> None:
    """``module.warmup_cosine_lr`` raises KeyboardInterrupt at its ``call``-th call from now."""
    schedule, calls = module.warmup_cosine_lr, []

    def crash(lr, step, *args):
        calls.append(step)
        if len(calls) == call:
            raise KeyboardInterrupt
        return schedule(lr, step, *args)

    monkeypatch.setattr(module, "warmup_cosine_lr", crash)


def drop_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def assert_same_checkpoints(a, b) -> None:
    """Two checkpoint files hold the same names and bit-identical tensors."""
    a, b = load_tensors(a), load_tensors(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
