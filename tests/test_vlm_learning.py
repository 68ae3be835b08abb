"""The vision-language model learns to read images (slow: about 15 minutes on 2 cores).

An SFT run from scratch is scored by CircularEval against the uniform guesser's (1/N)^N and
against the same model trained without the image; colour, the task it learns first, holds at
image sizes never seen in training; an RL stage on top records the held-out metrics of its
start (``baseline/``) beside its own (``eval/``), as the LLM family measures alignment.
"""

import pytest

from mlatlas.core.run import Run
from mlatlas.multimodal import vlm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-learning")
    out = {}
    for name, overrides in (("image", {"steps": 900}), ("text", {"steps": 300,
                                                               "text_only": True})):
        cfg = vlm.Config(stage="sft", eval_every=300, log_every=25, **overrides)
        out[name] = vlm.train(cfg, Run.create("vlm", cfg, root=root), progress=False)
    # create: the rl stage's defaults (lr 5e-5) under these fields, as on the command line.
    cfg = vlm.Config.create(stage="rl", steps=20, log_every=5, eval_every=10, ckpt_every=20,
                            init_from=str(out["image"].dir))
    out["rl"] = vlm.train(cfg, Run.create("vlm", cfg, root=root), progress=False)
    return out


@pytest.fixture(scope="module")
def scores(runs):
    return {name: vlm.evaluate(runs[name], n=120, seed=0) for name in ("image", "text")}


def test_circular_eval_far_above_the_uniform_guesser_and_the_text_only_model(scores):
    image, text = scores["image"], scores["text"]
    assert image["circular"] > 40 * image["random_circular"]
    assert image["circular"] > text["circular"] + 0.05
    assert image["circular_colour"] >= 0.7 and text["circular_colour"] <= 0.45


def test_colour_holds_at_image_sizes_not_seen_in_training(scores):
    assert scores["image"]["unseen_circular_colour"] >= 0.6


def test_the_rl_stage_is_measured_against_its_start(runs):
    summary = runs["rl"].summary()
    for key in ("circular", "vanilla", "open_accuracy"):
        assert f"baseline/{key}" in summary and f"eval/{key}" in summary
    rewards = [row["reward"] for row in runs["rl"].metrics if "reward" in row]
    assert len(rewards) == 4 and all(0 <= r <= 1 for r in rewards)
