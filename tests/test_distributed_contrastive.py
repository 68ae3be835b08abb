"""The contrastive trainers data-parallel: ``mlatlas train METHOD --nproc 2`` (gloo on the CPU)
ends with the parameters of a one-process run of the same global batch, for each of the
methods' distributed losses (CLIP's all-gather, SigLIP's ring, SimCLR's NT-Xent, CPC's InfoNCE,
BLIP's three losses with hard negatives mined across ranks, LiT on a SimCLR tower); --precision
bf16 and fp16 train every method; --compile (slow) matches eager.

What "the same parameters" can mean. AdamW divides each gradient element by its own running
scale, so an element whose exact gradient is zero steps by its rounding noise, up to lr a step,
and two world sizes round differently. Two kinds of such elements:

- the key bias of every attention layer: softmax over the keys ignores q . b_k, which is the same
  for every key, so the loss does not depend on it at all; it is left out of the comparison;
- an element whose gradient happens to lie within rounding of zero, such as a first-layer weight
  of the digits' border pixels, which are almost always 0. A run has a few of them at most: after
  4 steps at lr 1e-3, one of the 28,200 weights of SimCLR ends 1.6e-5 apart, one of CLIP's
  78,689 2.2e-6, two of BLIP's 115,083 1.9e-6, every other element of every run within 8e-7. So
  the comparison allows ``FEW`` elements past 1e-6 (within 1e-4), where a wrong gradient would
  move almost all of them.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from parallel import params, train_run

from mlatlas.contrastive import blip, clip, cpc, lit, simclr
from mlatlas.contrastive.common import TOKENIZER
from mlatlas.contrastive.text import load_tokenizer
from mlatlas.core.io import load_tensors, read_json
from mlatlas.core.run import Run
from mlatlas.core.runtime import seed_everything

STEPS = ("--batch-size", "16", "--steps", "4", "--log-every", "2", "--ckpt-every", "4",
         "--warmup-steps", "2")
# Width 64: below it GroupNorm's groups hold one channel each, and the conv bias in front of a
# group is another parameter the loss does not depend on.
TOWERS = ("--dataset", "digits", "--width", "64", *STEPS)
TEXT = (*TOWERS, "--embed-dim", "8", "--vocab-size", "40", "--text-depth", "1")
RUNS = {
    "clip": TEXT,
    "siglip": TEXT,
    "simclr": (*TOWERS, "--projection-dim", "8"),
    "cpc": ("--dataset", "digits", "--prediction-steps", "2", "--hidden", "8", "--z-dim", "8",
            "--c-dim", "8", *STEPS),
    "blip": (*TEXT, "--heads", "2"),
    "lit": (*TEXT, "--pretrain-steps", "4"),
}


def comparable(directory: Path, group: str = "model") -> dict[str, torch.Tensor]:
    """A checkpoint group's tensors, the key half of each fused key-value bias left out."""
    tensors = params(directory, group)
    return {k: v[len(v) // 2:] if k.endswith("kv_proj.bias") else v for k, v in tensors.items()}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """|a - b| of every element of the tensors of two checkpoint groups."""
    assert a.keys() == b.keys() and a
    return torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])


FEW = 4


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal within 1e-6 but for at most ``FEW`` elements, those within 1e-4 (see above)."""
    gaps = differences(a, b)
    assert gaps.max() <= 1e-4 and int((gaps > 1e-6).sum()) <= FEW, \
        f"largest difference {float(gaps.max()):.3g}, {int((gaps > 1e-6).sum())} past 1e-6"


def initial_model(directory: Path) -> torch.nn.Module:
    """The model a run starts from: its method's build from its config and seed."""
    run = Run.open(directory)
    cfg = run.load_config()
    if run.method == "simclr":
        seed_everything(cfg.seed)
        return simclr.build_model(cfg, simclr.load_data(cfg).image_shape)
    if run.method == "cpc":
        return cpc.random_model(cfg, cpc.load_sequences(cfg))
    tokenizer = load_tokenizer(run.path(TOKENIZER), cfg.max_len)
    seed_everything(cfg.seed)
    if run.method == "blip":
        return blip.build_model(cfg, blip.load_data(cfg), tokenizer)
    return clip.build_model(cfg, clip.load_data(cfg), tokenizer)  # clip, siglip; lit's text side


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def moved(directory: Path, prefix: str = "") -> float:
    """The largest change of a run's parameters (those whose names start with ``prefix``)."""
    start = {k: v for k, v in initial_model(directory).state_dict().items()
             if k.startswith(prefix)}
    return float(differences(start, {k: v for k, v in params(directory).items()
                                     if k in start}).max())


def assert_runs_agree(one: Path, two: Path, nested: tuple[str, ...] = ()) -> None:
    """The one-process and two-process runs end with the same parameters (of the nested runs
    too), log the same losses and hold the same files: rank 0 alone wrote."""
    for directory in (Path("."), *map(Path, nested)):
        assert_same_parameters(comparable(one / directory), comparable(two / directory))
    # The logged loss is the mean over ranks, i.e. the loss of the global batch.
    rows_1, rows_2 = Run.open(one).metrics, Run.open(two).metrics
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert files(one) == files(two)
    assert Run.open(one).summary().keys() == Run.open(two).summary().keys()


# CLIP's all-gather, SigLIP's ring and SimCLR's NT-Xent by default; the others, which reuse
# those losses (LiT, BLIP's ITC) or the same gather (CPC), with `pytest -m slow`.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["clip", "siglip", "simclr", pytest.param("cpc", marks=SLOW),
                                    pytest.param("blip", marks=SLOW),
                                    pytest.param("lit", marks=SLOW)])
def test_two_ranks_equal_one_rank(method, tmp_path):
    one = train_run(tmp_path / "one", method, *RUNS[method])
    two = train_run(tmp_path / "two", method, *RUNS[method], nproc=2)
    # BLIP: hard negatives drawn over the global batch, negative images from other ranks.
    # LiT: its SimCLR tower's nested run too, and the text side moved (the tower is locked).
    assert_runs_agree(one, two, (lit.PRETRAIN_DIR,) if method == "lit" else ())
    assert moved(two, "text_" if method == "lit" else "") > 1e-3


@pytest.mark.slow
def test_blip_capfilt_two_ranks_equal_one(tmp_path):
    """Both stages (about 40 s): every rank captions and filters, rank 0 writes capfilt.json
    and the stage-2 run."""
    flags = (*RUNS["blip"], "--corrupt", "0.3", "--capfilt", "--filter-threshold", "0.05")
    one = train_run(tmp_path / "one", "blip", *flags)
    two = train_run(tmp_path / "two", "blip", *flags, nproc=2)
    assert_runs_agree(one, two, (blip.STAGE2,))
    filtered = [blip.CapFiltResult.from_dict(read_json(d / blip.CAPFILT)) for d in (one, two)]
    assert filtered[0].synthetic == filtered[1].synthetic
    for name in ("p_original", "p_synthetic"):
        torch.testing.assert_close(getattr(filtered[0], name), getattr(filtered[1], name),
                                   rtol=0, atol=1e-5)
    assert moved(two) > 1e-3


# --- mixed precision and compile ------------------------------------------------------------

TINY = dict(dataset="digits", width=64, batch_size=16, log_every=4, ckpt_every=100,
            warmup_steps=2)
TINY_TEXT = dict(TINY, embed_dim=8, vocab_size=40, text_depth=1)
CONFIGS = {
    "clip": (clip, clip.Config(**TINY_TEXT)),
    "siglip": (clip, clip.SigLIPConfig(**TINY_TEXT)),
    "simclr": (simclr, simclr.Config(**TINY, projection_dim=8)),
    "cpc": (cpc, cpc.Config(dataset="digits", prediction_steps=2, hidden=8, z_dim=8, c_dim=8,
                            batch_size=16, log_every=4, ckpt_every=100, warmup_steps=2)),
    "blip": (blip, blip.Config(**TINY_TEXT, heads=2)),
    "lit": (lit, lit.Config(**TINY_TEXT, pretrain_steps=4)),
}


@pytest.fixture
def no_reports(monkeypatch):
    """Training only: the evaluations after it are what the other tests score."""
    for module in (clip, simclr, cpc, blip):
        monkeypatch.setattr(module, "report", lambda *args, **kwargs: {})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_mixed_precision_trains(method, precision, runs, no_reports):
    """12 steps (fp16's first ones skip while the loss scale falls from 2^16 to what the
    gradients fit): finite losses, parameters moved, the fp16 scale checkpointed."""
    module, base = CONFIGS[method]
    cfg = dataclasses.replace(base, steps=12, precision=precision)
    run = module.train(cfg, Run.create(cfg.METHOD, cfg, runs), progress=False)
    assert all(math.isfinite(r["loss"]) for r in run.metrics)
    assert moved(run.dir, "text_" if method == "lit" else "") > 1e-3
    tensors = load_tensors(run.path("checkpoint.safetensors"))
    assert ("precision.scale" in tensors) == (precision == "fp16")


@pytest.mark.slow  # one process in mixed precision is tested by default, above
@pytest.mark.parametrize("method, precision", [("blip", "bf16"), ("simclr", "fp16")])
def test_mixed_precision_two_ranks(method, precision, tmp_path):
    """Half-precision tensors through the collectives (BLIP gathers bf16 image tokens), and
    fp16's skipped steps decided alike on every rank: the run trains and its ranks agree."""
    two = train_run(tmp_path, method, *RUNS[method], "--steps", "12", "--precision", precision,
                    nproc=2)
    assert all(math.isfinite(r["loss"]) for r in Run.open(two).metrics)
    assert moved(two) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clip", "simclr", "cpc", "blip"])
def test_compile_matches_eager(method, runs, no_reports):
    """The first compiled run of the session pays for the compiler (about 50 s)."""
    module, base = CONFIGS[method]

    def final(compile_: bool) -> dict[str, torch.Tensor]:
        cfg = dataclasses.replace(base, steps=4, compile=compile_)
        return comparable(module.train(cfg, Run.create(cfg.METHOD, cfg, runs),
                                       progress=False).dir)

    assert differences(final(False), final(True)).max() < 1e-4
