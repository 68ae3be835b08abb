"""LiT: the image tower stays bit-identical while the text side learns, a tower that does not fit
is refused, the nested SimCLR pre-training resumes; (slow) zero-shot far above chance."""

import pytest
import torch
from crashes import assert_same_checkpoints, crash_at

from mlatlas.contrastive import clip, lit, simclr
from mlatlas.core.config import ConfigError
from mlatlas.core.io import load_tensors
from mlatlas.core.run import Run

TINY = dict(dataset="digits", width=16, embed_dim=8, vocab_size=40, text_depth=1, batch_size=16,
            log_every=2, ckpt_every=4, warmup_steps=2)


@pytest.fixture(autouse=True)
def no_probes(monkeypatch):
    # The linear probes of the reports take seconds and are tested with SimCLR and CLIP.
    monkeypatch.setattr(simclr, "report", lambda *args: {})
    monkeypatch.setattr(clip, "report", lambda *args: {})


def simclr_run(runs, **overrides):
    cfg = simclr.Config(**{**dict(dataset="digits", width=16, projection_dim=8, batch_size=16,
                                  warmup_steps=2, cnn_stages=lit.Config.cnn_stages),
                           **overrides}, steps=3)
    return simclr.train(cfg, Run.create("simclr", cfg, runs), progress=False)


def tensors(run, prefix):
    return {k[len(prefix):]: v for k, v in load_tensors(run.path("checkpoint.safetensors")).items()
            if k.startswith(prefix)}


def test_locked_image_tower_is_bit_identical_after_training_and_the_text_tower_moves(runs):
    source = simclr_run(runs)
    cfg = lit.Config(**TINY, steps=6, image_run=str(source.dir))
    run = lit.train(cfg, Run.create("lit", cfg, runs), progress=False)
    encoder = tensors(source, "model.encoder.")
    locked = tensors(run, "model.image_tower.tower.")
    assert encoder.keys() == locked.keys()
    assert all(torch.equal(encoder[k], locked[k]) for k in encoder)
    # The text tower starts from the seed's initialisation (rebuilt here) and is trained.
    _, model, tokenizer, data = lit.load_model(run)
    initial = lit.build_model(cfg, data, tokenizer, model.image_tower).text_tower.state_dict()
    trained = tensors(run, "model.text_tower.")
    assert initial.keys() == trained.keys()
    assert not all(torch.equal(initial[k], trained[k]) for k in initial)
    model.train()
    assert not model.image_tower.tower.training
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert all(p.requires_grad for p in model.text_tower.parameters())


@pytest.mark.parametrize("overrides, match", [
    ({"width": 24}, "width 16"),
    ({"image_tower": "vit"}, "cnn tower"),
    ({"cnn_stages": 3}, "cnn tower of 4 stages; this LiT run asks for --cnn-stages 3"),
    ({"dataset": "shapes", "n_train": 64}, "1-channel"),
])
def test_a_tower_that_does_not_fit_is_a_config_error(runs, overrides, match):
    source = simclr_run(runs)
    cfg = lit.Config(**{**TINY, **overrides}, steps=2, image_run=str(source.dir))
    with pytest.raises(ConfigError, match=match):
        lit.train(cfg, Run.create("lit", cfg, runs), progress=False)


def test_image_run_must_be_a_run_with_a_tower(runs, tmp_path):
    cfg = lit.Config(**TINY, steps=2, image_run=str(tmp_path))
    with pytest.raises(ConfigError, match="not a run folder"):
        lit.train(cfg, Run.create("lit", cfg, runs), progress=False)
    with pytest.raises(ConfigError, match="--text-tower"):
        lit.Config(text_tower="minilm")


def test_nested_pretraining_and_a_resumed_lit_run_equal_an_uninterrupted_one(runs, monkeypatch):
    cfg = lit.Config(**TINY, steps=8, pretrain_steps=6)
    whole = lit.train(cfg, Run.create("lit", cfg, runs), progress=False)
    nested = Run.open(whole.path(lit.PRETRAIN_DIR))
    assert nested.method == "simclr" and nested.checkpoint_step() == 6
    assert nested.load_config() == lit.pretrain_config(cfg)
    encoder, locked = tensors(nested, "model.encoder."), tensors(whole, "model.image_tower.tower.")
    assert all(torch.equal(encoder[k], locked[k]) for k in encoder)

    # Crash in the SimCLR stage (its step 5, after the checkpoint at 4), then in the LiT stage
    # (its step 6), resuming each time.
    run = Run.create("lit", cfg, runs)
    for module, step in ((simclr, 5), (clip, 6)):
        crash_at(monkeypatch, module, step)
        with pytest.raises(KeyboardInterrupt):
            lit.train(cfg, Run.open(run.dir), progress=False)
        monkeypatch.undo()
    assert Run.open(run.path(lit.PRETRAIN_DIR)).checkpoint_step() == 6
    assert run.checkpoint_step() == 4
    lit.train(cfg, Run.open(run.dir), progress=False)
    for sub in ("", lit.PRETRAIN_DIR):
        assert_same_checkpoints(*(r.path(sub) / "checkpoint.safetensors" for r in (whole, run)))


# --- behaviour ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_lit_zero_shot_on_held_out_colour_shape_pairs_is_far_above_chance(runs, monkeypatch):
    """400 SimCLR steps, then 800 text-side steps at batch 64 (about 2.5 minutes). Measured:
    zero-shot accuracy 20.9% over the 24 (colour, shape) classes (chance 4.2%) on the held-out
    pairs, text-to-image recall@10 0.987. CLIP trained end to end with the same text-side
    settings reaches 57.4% (test_clip): a short SimCLR pre-training taught with colour jitter
    is a weaker tower than the one CLIP learns from the captions themselves."""
    monkeypatch.undo()
    # The nested SimCLR run's own probes are not what this test measures.
    monkeypatch.setattr(simclr, "report", lambda *args: {})
    cfg = lit.Config(n_train=6000, width=64, embed_dim=32, batch_size=64, steps=800,
                     pretrain_steps=400)
    summary = lit.train(cfg, Run.create("lit", cfg, runs), progress=False).summary()
    assert summary["eval/zero_shot_top1"] > 2.5 * summary["eval/zero_shot_chance"]
    assert summary["eval/t2i_recall@10"] > 0.9
