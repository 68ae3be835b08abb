"""The vision-language model: the batch layout, rewards, the staged runs and the command line."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.data.vqa import CATEGORIES, save_image, vqa_set
from mlatlas.multimodal import vlm
from mlatlas.multimodal.model import CAPTION_PROMPT, prompt_text

TINY = dict(steps=4, batch_size=8, n_train=64, eval_n=12, eval_every=2, log_every=2,
            ckpt_every=4, vit_width=32, vit_depth=1, dim=32, n_layers=2, n_heads=2,
            n_experts=4, top_k=2, expert_dim=16, max_new_tokens=4)


def _model(cfg=None):
    cfg = cfg or vlm.Config(**TINY)
    torch.manual_seed(0)
    return vlm._build(cfg, "cpu")


def test_prompt_lists_the_options_with_labels():
    assert prompt_text("what shape is shown?", ("circle", "cross")) == \
        "what shape is shown?\nA. circle\nB. cross\nanswer:"
    assert prompt_text("how many?") == "how many?\nanswer:"


def test_a_row_computes_what_it_computes_alone():
    """Rows of other lengths (images of other sizes, longer prompts) pad it, and its answer's
    log-probabilities stay those of the row alone."""
    model, tokenizer = _model()
    model.eval()
    data = vqa_set(6, seed=3, split="test")
    prompts = [prompt_text(q) for q in data.questions]
    ids = vlm._encode(tokenizer, prompts, bos=True)
    answers = vlm._encode(tokenizer, data.answers, eos=True)
    with torch.no_grad():
        batch = model.answer_logprobs(model.rows(data.images, ids, answers))
        for i in range(len(data)):
            alone = model.answer_logprobs(model.rows(data.images[i:i + 1], ids[i:i + 1],
                                                     answers[i:i + 1]))
            got = batch[i][batch[i] != 0]
            torch.testing.assert_close(got, alone[0][alone[0] != 0], atol=1e-5, rtol=1e-5)
            assert len(got) == len(answers[i])


def test_rows_place_image_tokens_between_bos_and_prompt():
    model, tokenizer = _model()
    data = vqa_set(2, seed=1, split="test")
    ids = vlm._encode(tokenizer, ["ab", "abcd"], bos=True)
    rows = model.rows(data.images, ids, vlm._encode(tokenizer, ["x", "yz"], eos=True))
    tokens, cu = model.vision(data.images)
    n = cu.diff()
    for i in range(2):
        real = rows.mask[i].bool()
        start = int(real.nonzero()[0])
        assert rows.ids[i, start] == tokenizer.bos_id
        torch.testing.assert_close(rows.embeds[i, start + 1:start + 1 + n[i]],
                                   tokens[cu[i]:cu[i + 1]])
        assert rows.answer[i].sum() == len(["x", "yz"][i]) + 1
    # The text-only layout has no image tokens: bos, then the prompt.
    text = model.rows(None, ids)
    assert text.mask.sum() == sum(len(r) for r in ids)


def test_reward_reads_open_replies_and_options():
    r = vlm.reward(["3", " Red ", "blue", "B", "it is a circle", "A or B"],
                   ["3", "red", "red", "cross", "circle", "circle"],
                   [None, None, None, ("circle", "cross"), ("circle", "cross"),
                    ("circle", "cross")])
    assert r.tolist() == [1, 1, 0, 1, 1, 0]


def test_config_refuses_what_cannot_run():
    with pytest.raises(ConfigError, match="init-from"):
        vlm.Config(stage="rl")
    with pytest.raises(ConfigError, match="text-only"):
        vlm.Config(stage="vision", text_only=True)
    with pytest.raises(ConfigError, match="top-k"):
        vlm.Config(top_k=9, n_experts=8)
    with pytest.raises(ConfigError, match="stage"):
        vlm.Config(stage="pretrain")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """vision -> joint -> sft -> rl, each a tiny run started from the previous one."""
    root = tmp_path_factory.mktemp("vlm")
    runs = {}
    previous = ""
    for stage in ("vision", "joint", "sft", "rl"):
        cfg = vlm.Config(**TINY, stage=stage, init_from=previous, prompts_per_step=2,
                         group_size=2)
        run = vlm.train(cfg, Run.create("vlm", cfg, root=root), progress=False)
        runs[stage] = run
        previous = str(run.dir)
    return runs


def test_every_stage_trains_and_records_its_losses(chain):
    rows = {stage: run.metrics for stage, run in chain.items()}
    assert "siglip" in rows["vision"][-1] and "nll" in rows["vision"][-1]
    assert "nll" in rows["sft"][-1]
    assert "reward" in rows["rl"][-1]
    for run in chain.values():
        summary = run.summary()
        # Every pass right implies the first pass right.
        assert 0 <= summary["eval/circular"] <= summary["eval/vanilla"] <= 1
        assert summary["train/decoder_active_parameters"] < summary["train/decoder_parameters"]
    assert "baseline/circular" in chain["rl"].summary()


def test_the_decoder_exports_to_transformers_deepseek_v3(chain):
    transformers = pytest.importorskip("transformers")
    model, tokenizer, _ = vlm.load_vlm(chain["sft"].dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(chain["sft"].dir / "hf-decoder")
    ids = torch.tensor([tokenizer.encode("how many circles are there?", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.decoder(ids), atol=1e-5, rtol=1e-5)


def test_a_stage_starts_from_the_previous_stage_weights(chain):
    before, _, _ = vlm.load_vlm(chain["vision"].dir)
    cfg = vlm.Config(**{**TINY, "steps": 1}, init_from=str(chain["vision"].dir))
    after, _ = vlm._build(cfg, "cpu")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_evaluate_reports_circular_eval_per_category_and_unseen_sizes(chain):
    metrics = vlm.evaluate(chain["sft"], n=12, seed=0)
    for name in CATEGORIES:
        assert 0 <= metrics[f"circular_{name}"] <= 1
        assert f"unseen_circular_{name}" in metrics and f"open_{name}" in metrics
    assert metrics["random_circular"] == pytest.approx(
        sum((1 / len(o)) ** len(o) for o in vqa_set(12, seed=1000, split="test").options) / 12)
    assert chain["sft"].summary()["eval/circular"] == metrics["circular"]
    assert vlm.evaluate(chain["sft"], n=12, seed=0) == metrics  # the seed fixes the draw
    assert (chain["sft"].dir / "examples.png").is_file()


def test_captions_train_against_the_caption_prompt(chain):
    model, tokenizer, _ = vlm.load_vlm(chain["vision"].dir)
    data = vqa_set(4, seed=0, split="train")
    loss = vlm.answer_nll(model, tokenizer, data.images, [CAPTION_PROMPT] * 4, data.captions)
    assert torch.isfinite(loss) and loss > 0


def test_text_only_baseline_sees_no_image(tmp_path):
    cfg = vlm.Config(**TINY, text_only=True)
    run = vlm.train(cfg, Run.create("vlm", cfg, root=tmp_path), progress=False)
    model, tokenizer, text_only = vlm.load_vlm(run.dir)
    assert text_only
    data = vqa_set(6, seed=0, split="test")
    other = replace(data, images=[torch.rand_like(im) for im in data.images])
    a = vlm._answer_all(model, tokenizer, data, list(range(6)), data.questions, True, 4, 8)
    b = vlm._answer_all(model, tokenizer, other, list(range(6)), data.questions, True, 4, 8)
    assert a == b


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlatlas", *args], capture_output=True,
                          text=True, timeout=300)


def test_sample_answers_a_question_about_an_image(chain, tmp_path):
    data = vqa_set(6, seed=0, split="test")
    save_image(data.images[0], tmp_path / "img.png")
    out = _cli("sample", str(chain["sft"].dir), "--image", str(tmp_path / "img.png"),
               "--question", "How many circles are there?", "--no-progress")
    assert out.returncode == 0, out.stderr
    replies = vlm.sample(chain["sft"], 1, 0, options=vlm.Options(
        image=str(tmp_path / "img.png"), question="how many circles are there?"))
    assert out.stdout.splitlines()[0] == replies[0]


def test_bad_input_is_one_line_and_exit_2(chain, tmp_path):
    run = str(chain["sft"].dir)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    big = tmp_path / "big.png"
    Image.new("RGB", (512, 512)).save(big)
    odd = tmp_path / "odd.png"
    Image.new("RGB", (30, 30)).save(odd)
    tsv = tmp_path / "no-options.tsv"
    tsv.write_text("index\tquestion\tA\tanswer\timage\n0\thow many?\t\t\t\n")
    cases = [("sample", run, "--image", str(tmp_path / "broken.png"), "--question", "q?"),
             ("sample", run, "--image", str(big), "--question", "q?"),
             ("sample", run, "--image", str(odd), "--question", "q?"),
             ("sample", run, "--image", str(big)),
             ("eval", run, "--tsv", str(tsv))]
    for args in cases:
        out = _cli(*args, "--no-progress")
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_eval_scores_an_mmbench_tsv(chain, tmp_path):
    from mlatlas.data.vqa import write_mmbench_tsv

    data = vqa_set(12, seed=5, split="test")
    write_mmbench_tsv(data, tmp_path / "q.tsv")
    metrics = vlm.evaluate(chain["sft"], options=vlm.Options(tsv=str(tmp_path / "q.tsv"),
                                                             results=str(tmp_path / "r.tsv")))
    assert 0 <= metrics["circular"] <= metrics["vanilla"] <= 1
    assert (tmp_path / "r.tsv").is_file()


def test_the_rl_stage_also_trains_with_kimi_k15s_objective(chain, tmp_path):
    cfg = vlm.Config(**{**TINY, "steps": 2, "ckpt_every": 2}, stage="rl", rl_loss="kimi",
                     init_from=str(chain["sft"].dir), prompts_per_step=2, group_size=2)
    run = vlm.train(cfg, Run.create("vlm", cfg, root=tmp_path), progress=False)
    start, _, _ = vlm.load_vlm(chain["sft"].dir)
    end, _, _ = vlm.load_vlm(run.dir)
    moved = max((a - b).abs().max() for a, b in zip(start.parameters(), end.parameters(),
                                                     strict=True))
    rows = run.metrics
    assert all("reward" in r and "clip_frac" not in r for r in rows)
    # Groups whose replies are all right or all wrong carry no signal: the surrogate's gradient
    # at pi_old is -2 tau mean_j (r_j - r_bar) grad log pi, zero for equal rewards.
    signal = any(r["zero_std_frac"] < 1 for r in rows)
    assert (moved > 0) == signal
