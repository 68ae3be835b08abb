"""A small Kimi-VL (Kimi Team 2025, "Kimi-VL Technical Report"), trained in stages.

The model (:mod:`mlatlas.multimodal.model`): MoonViT encodes images at their native resolution,
packed into one sequence (:mod:`mlatlas.multimodal.vision`); a 2x2 pixel shuffle and an MLP
project them into a mixture-of-experts decoder in the DeepSeek-V3 shape
(:mod:`mlatlas.multimodal.decoder`). Kimi-VL trains it in stages, each run here a separate
``mlatlas train vlm --stage S`` chained with ``--init-from`` (as the LLM family chains SFT and
RL):

    vision  MoonViT pre-training, CoCa-style: SigLIP's sigmoid loss between the pooled image
            features x_i and a text tower's caption features y_j,
                L_sig = -(1/N) sum_{i,j} log sigma(z_ij (t x_i . y_j + b)),  z_ij = 2[i = j] - 1,
            plus the captioning loss L_cap = -(1/|c|) sum_t log p(c_t | image, c_<t) of the
            decoder (``contrastive.losses.siglip_loss``); L = L_sig + w_cap L_cap
    joint   joint pre-training of everything on captions and questions, mixed
    sft     supervised fine-tuning on questions alone, open and multiple-choice (the options
            listed in the prompt in a random rotation, the reply the right option's text)
    rl      reinforcement learning on the verifiable answers: G replies sampled per question,
            reward r = 1[the reply is right], and GRPO's clipped group-relative objective
            (``llm.grpo.grpo_loss``, A_i = (r_i - mean r) / (std r + eps)) or Kimi k1.5's
            squared mirror-descent surrogate (``llm.kimi.kimi_loss``)

Every supervised loss is the token mean of the answer's negative log-likelihood
(:func:`mlatlas.multimodal.model.VLM.answer_logprobs`); with the MoE decoder's ``balance`` aux the
classic load-balancing loss is added, with ``bias`` the router biases follow the loads after
each step (DeepSeek-V3's auxiliary-loss-free balancing).

Evaluation (``mlatlas eval RUN``) asks generated test questions in MMBench's layout under
CircularEval (:mod:`mlatlas.eval.circular`: every rotation of the options must be answered
right; a uniform guesser scores (1/N)^N), per category, on the training image sizes and on
sizes never seen in training, and the same questions open (no options, exact match).
"""

from __future__ import annotations

import copy
import string
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from mlatlas.contrastive.losses import siglip_loss
from mlatlas.core import distributed
from mlatlas.core.config import (
    BatchConfig,
    ConfigError,
    check_options,
    require_at_least,
    require_unit,
)
from mlatlas.core.io import read_json, write_json
from mlatlas.core.optim import set_lr, warmup_cosine_lr
from mlatlas.core.precision import Precision, compile_module
from mlatlas.core.run import Run, RunError, fit
from mlatlas.core.runtime import resolve_device, seed_everything
from mlatlas.data.vqa import CATEGORIES, VQASet, load_image, to_questions, vqa_set
from mlatlas.eval import circular
from mlatlas.llm.common import step_generator, token_mean, warmup_steps
from mlatlas.llm.grpo import group_advantages, grpo_loss
from mlatlas.llm.kimi import kimi_loss
from mlatlas.multimodal.decoder import (
    DecoderConfig,
    active_parameters,
    count_parameters,
    dense_equivalent,
    generate,
    save_pretrained,
)
from mlatlas.multimodal.model import CAPTION_PROMPT, VLM, prompt_text
from mlatlas.multimodal.vision import EncoderConfig
from mlatlas.nn.tokenizers import Tokenizer

__all__ = ["Config", "Options", "train", "sample", "evaluate",
           "load_vlm", "answer", "reward"]

MODEL_FILE = "vlm.json"
TOKENIZER_FILE = "tokenizer.json"
ALPHABET = string.ascii_lowercase + string.digits + "ABCDEFGH .,?:;'-\n"
"""Every character the tokenizer knows (generated questions use a subset; others are <unk>)."""
EVAL_QUESTIONS = 600
Stage = Literal["vision", "joint", "sft", "rl"]


@dataclass
class Config(BatchConfig):
    METHOD: ClassVar[str] = "vlm"
    SHARDED: ClassVar[tuple[str, ...]] = ("batch_size", "prompts_per_step")

    stage: Stage = "sft"
    """Training stage: vision (SigLIP + captioning), joint (captions and questions), sft
    (questions) or rl (GRPO or Kimi k1.5 on the verifiable answers)."""
    init_from: str = ""
    """The vlm run of the previous stage to start from (empty: a fresh model)."""
    steps: int = 1500
    """Optimisation steps (rl: iterations of sampling then updating); the vision stage's
    default is 600, joint's 500, rl's 60."""
    batch_size: int = 48
    """Items per step (image-caption pairs or questions)."""
    lr: float = 5e-4
    """Peak AdamW learning rate (warm-up then cosine decay to 0; rl's default 5e-5); at 2e-3
    the model settles on each task's most common answer and never learns to read the image."""
    warmup_ratio: float = 0.05
    """Fraction of --steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns it off."""
    n_train: int = 12000
    """Generated training items (images with a caption and a question)."""
    mc_share: float = 0.5
    """Share of questions asked multiple-choice (options in the prompt) rather than open."""
    caption_share: float = 0.5
    """joint stage: share of a batch that is captions rather than questions."""
    caption_weight: float = 1.0
    """vision stage: weight w_cap of the captioning loss beside SigLIP's."""
    text_only: bool = False
    """Train and answer without the image tokens: the no-image baseline."""
    max_patches: int = 512
    """Patch budget of one packed encoder sequence: a batch is encoded as sequences of at most
    this many patches, and an image above it is refused."""
    eval_every: int = 250
    """CircularEval on held-out questions every this many steps (a multiple of log_every)."""
    eval_n: int = 120
    """Held-out questions per periodic evaluation."""
    max_new_tokens: int = 8
    """Longest reply generated."""
    # RL stage
    rl_loss: Literal["grpo", "kimi"] = "grpo"
    """rl stage objective: grpo (clipped ratio, group-normalised advantages) or kimi (k1.5's
    squared surrogate)."""
    prompts_per_step: int = 16
    """rl stage: questions per iteration, each answered group_size times."""
    group_size: int = 8
    """rl stage: replies sampled per question, G."""
    temperature: float = 1.0
    """rl stage: sampling temperature of the replies."""
    beta: float = 0.02
    """rl stage (grpo): weight of the k3 KL to the frozen starting model."""
    clip_eps: float = 0.2
    """rl stage (grpo): ratio clip range."""
    tau: float = 1.0
    """rl stage (kimi): weight of the KL to the sampling policy."""
    # the model (ignored with --init-from)
    patch_size: int = 4
    """Patch side p in pixels; image sides must be multiples of 2p."""
    vit_width: int = 64
    """Encoder width."""
    vit_depth: int = 2
    """Encoder blocks."""
    vit_heads: int = 4
    """Encoder attention heads."""
    dim: int = 96
    """Decoder width."""
    n_layers: int = 3
    """Decoder layers (the first dense, the others MoE)."""
    n_heads: int = 4
    """Decoder attention heads."""
    n_experts: int = 8
    """Routed experts per MoE layer."""
    n_shared: int = 1
    """Always-on shared experts per MoE layer."""
    top_k: int = 2
    """Routed experts per token."""
    expert_dim: int = 64
    """Hidden width of an expert."""
    balance: Literal["bias", "aux", "none"] = "bias"
    """Load balancing: bias (DeepSeek-V3's auxiliary-loss-free bias updates), aux (the
    classic load-balancing loss) or none."""
    dense: bool = False
    """A dense decoder with the MoE model's active parameters instead (the comparison)."""
    log_every: int = 25
    ckpt_every: int = 500

    # Each stage's defaults under the flags given (``create``): RL moves a trained model, with
    # a learning rate ten times smaller (at 5e-4 the KL to the start passes 1 nat per reply in
    # 25 iterations).
    STAGE_DEFAULTS: ClassVar[dict[str, dict]] = {
        "vision": {"steps": 600}, "joint": {"steps": 500},
        "rl": {"steps": 60, "lr": 5e-5, "log_every": 5, "eval_every": 20, "ckpt_every": 20}}

    @classmethod
    def create(cls, **overrides) -> Config:
        """The config for these flags, the stage's defaults (``STAGE_DEFAULTS``) under them."""
        stage = overrides.get("stage", cls.stage)
        return cls(**{**cls.STAGE_DEFAULTS.get(stage, {}), **overrides})

    def check(self) -> None:
        super().check()
        require_at_least(self, 1, "batch_size", "eval_every", "eval_n", "max_new_tokens",
                         "prompts_per_step", "patch_size", "vit_width", "vit_depth", "vit_heads",
                         "dim", "n_layers", "n_heads", "n_experts", "top_k", "expert_dim")
        require_at_least(self, 2, "group_size")
        require_at_least(self, 16, "n_train", "max_patches")
        require_unit(self, "warmup_ratio", "mc_share", "caption_share")
        if self.top_k > self.n_experts:
            raise ConfigError(f"--top-k {self.top_k} exceeds --n-experts {self.n_experts}")
        if min(self.grad_clip, self.weight_decay, self.beta, self.caption_weight,
               self.temperature) < 0 or self.tau <= 0 or self.clip_eps <= 0:
            raise ConfigError("--grad-clip, --weight-decay, --beta, --caption-weight and "
                              "--temperature must be >= 0, --tau and --clip-eps > 0")
        if self.eval_every % self.log_every:
            raise ConfigError(f"--eval-every {self.eval_every} must be a multiple of "
                              f"--log-every {self.log_every}")
        if self.stage == "vision" and self.text_only:
            raise ConfigError("the vision stage trains the image encoder: --text-only has no "
                              "image to train on")
        if self.stage == "rl" and not self.init_from:
            raise ConfigError("the rl stage starts from a trained model: give --init-from "
                              "RUN_DIR (an sft run)")

    def check_data(self) -> None:
        if self.init_from:
            source = Path(self.init_from)
            if not (source / MODEL_FILE).is_file() or not Run.open(source).has_checkpoint():
                raise ConfigError(f"{source} is not a vlm run with a checkpoint")
            if read_json(source / MODEL_FILE).get("text_only", False) != self.text_only:
                raise ConfigError(f"{source} was trained with text_only="
                                  f"{not self.text_only}; give the same --text-only")

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(patch_size=self.patch_size, width=self.vit_width,
                             depth=self.vit_depth, heads=self.vit_heads,
                             max_patches=self.max_patches)

    def decoder_config(self, vocab_size: int) -> DecoderConfig:
        moe = DecoderConfig(vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers,
                            n_heads=self.n_heads, n_routed_experts=self.n_experts,
                            n_shared_experts=self.n_shared, num_experts_per_tok=self.top_k,
                            moe_intermediate_size=self.expert_dim, balance=self.balance,
                            max_seq_len=512)
        return dense_equivalent(moe) if self.dense else moe


# the model on disk -------------------------------------------------------------------------------

def load_vlm(path: str | Path, device: torch.device | str = "cpu",
             max_patches: int | None = None) -> tuple[VLM, Tokenizer, bool]:
    """The model of a vlm run (its latest checkpoint), its tokenizer and whether it is the
    text-only baseline; ``max_patches`` replaces the run's patch budget."""
    path = Path(path)
    shapes = read_json(path / MODEL_FILE)
    encoder = EncoderConfig(**shapes["encoder"])
    if max_patches is not None:
        encoder.max_patches = max_patches
    model = VLM(encoder, DecoderConfig(**shapes["decoder"]))
    Run.open(path).load_weights(model, "model")
    return model.to(device), Tokenizer.load(path / TOKENIZER_FILE), shapes["text_only"]


def _write_model_files(run: Run, model: VLM, tokenizer: Tokenizer, text_only: bool) -> None:
    if distributed.is_main():
        write_json(run.path(MODEL_FILE), {"encoder": asdict(model.encoder_cfg),
                                          "decoder": asdict(model.decoder_cfg),
                                          "text_only": text_only})
        tokenizer.save(run.path(TOKENIZER_FILE))


# batches -----------------------------------------------------------------------------------------

def _encode(tokenizer: Tokenizer, texts: Sequence[str], bos: bool = False, eos: bool = False
            ) -> list[list[int]]:
    rows = tokenizer.encode_batch(list(texts), bos=bos)
    return [r + [tokenizer.eos_id] for r in rows] if eos else rows


def _rotated(data: VQASet, idx: list[int], mc: torch.Tensor, shift: torch.Tensor
             ) -> tuple[list[str], list[str], list[tuple[str, ...] | None]]:
    """Prompts, target replies and options (None for an open question) of questions ``idx``:
    multiple-choice where ``mc``, the options shifted cyclically by ``shift`` (so the right
    option's place varies), else open."""
    prompts, replies, shown = [], [], []
    for row, i in enumerate(idx):
        options = None
        if mc[row]:
            k = int(shift[row]) % len(data.options[i])
            options = data.options[i][k:] + data.options[i][:k]
        prompts.append(prompt_text(data.questions[i], options or ()))
        replies.append(data.answers[i])
        shown.append(options)
    return prompts, replies, shown


def _images(data: VQASet, idx: Sequence[int], text_only: bool):
    return None if text_only else [data.images[i] for i in idx]


def answer_nll(model: VLM, tokenizer: Tokenizer, images, prompts: Sequence[str],
               replies: Sequence[str], encoded=None) -> torch.Tensor:
    """This rank's share of the token-mean -log p(reply | image, prompt) of the global batch
    (``encoded``: the images' encoder tokens, if already computed)."""
    rows = model.rows(images, _encode(tokenizer, prompts, bos=True),
                      _encode(tokenizer, replies, eos=True), encoded)
    logp = model.answer_logprobs(rows)
    return -token_mean(logp, rows.answer[:, 1:])


def answer(model: VLM, tokenizer: Tokenizer, images, prompts: Sequence[str], *,
           max_new_tokens: int = 8, temperature: float = 0.0,
           generator: torch.Generator | None = None, sharded: bool = False
           ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Replies to ``prompts`` (greedy at temperature 0): the texts and the generated
    (ids, mask), each (B, L) with <eos> included. ``sharded``: the prompts are this rank's
    rows of a data-parallel job's global batch, sampled with the whole batch's draws."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rows = model.rows(images, _encode(tokenizer, prompts, bos=True))
        ids, mask = generate(model.decoder, rows.embeds, rows.mask,
                             max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                             pad_id=tokenizer.pad_id, temperature=temperature,
                             generator=generator, sharded=sharded)
    model.train(was_training)
    return tokenizer.decode_batch((ids * mask).tolist()), ids, mask


def _normalised(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def reward(replies: Sequence[str], answers: Sequence[str],
           options: Sequence[Sequence[str] | None]) -> torch.Tensor:
    """r = 1 for a right reply: the answer exactly (open questions, case and spaces aside), or
    the right option by CircularEval's extraction (multiple-choice, options given)."""
    hits = []
    for reply, truth, opts in zip(replies, answers, options, strict=True):
        if opts:
            hits.append(circular.extract_answer(reply, opts)
                        == circular.LABELS[list(opts).index(truth)])
        else:
            hits.append(_normalised(reply) == _normalised(truth))
    return torch.tensor(hits, dtype=torch.float32)


# training ----------------------------------------------------------------------------------------

def _build(cfg: Config, device) -> tuple[VLM, Tokenizer]:
    if cfg.init_from:
        model, tokenizer, _ = load_vlm(cfg.init_from, device, cfg.max_patches)
        return model, tokenizer
    tokenizer = Tokenizer.characters([ALPHABET])
    return VLM(cfg.encoder_config(), cfg.decoder_config(tokenizer.vocab_size)).to(device), \
        tokenizer


def train(cfg: Config, run: Run | None = None, progress: bool | None = None) -> Run:
    run = run or Run.create(cfg.METHOD, cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, tokenizer = _build(cfg, device)
    _write_model_files(run, model, tokenizer, cfg.text_only)
    data = vqa_set(cfg.n_train, seed=cfg.seed, split="train")
    held_out = vqa_set(cfg.eval_n, seed=cfg.seed + 1, split="test")
    run.write_summary({"train/steps": cfg.steps, "train/stage": cfg.stage,
                       "train/parameters": count_parameters(model.decoder)
                       + count_parameters(model.vision),
                       "train/decoder_parameters": count_parameters(model.decoder),
                       "train/decoder_active_parameters": active_parameters(model.decoder),
                       "train/encoder_parameters": count_parameters(model.vision)})
    reference = None
    if cfg.stage == "rl" and cfg.rl_loss == "grpo" and cfg.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    # --compile: the encoder's and the decoder's forward passes, in place (same state dict).
    compile_module(model.vision.encoder, cfg.compile)
    compile_module(model.decoder, cfg.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = Precision(cfg.precision, device)
    warmup = warmup_steps(cfg)
    if cfg.stage == "rl" and "baseline/circular" not in run.summary():
        run.write_evaluation(_held_out_metrics(model, tokenizer, held_out, cfg), "baseline")

    def supervised_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        generator = step_generator(cfg.seed, step)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=generator).tolist()
        mc = torch.rand(cfg.batch_size, generator=generator) < cfg.mc_share
        shift = torch.randint(4, (cfg.batch_size,), generator=generator)
        is_caption = torch.rand(cfg.batch_size, generator=generator) < (
            1.0 if cfg.stage == "vision" else cfg.caption_share if cfg.stage == "joint"
            else 0.0)
        prompts, replies, _ = _rotated(data, idx, mc, shift)
        prompts = [CAPTION_PROMPT if c else p for p, c in zip(prompts, is_caption, strict=True)]
        replies = [data.captions[i] if c else r
                   for i, r, c in zip(idx, replies, is_caption, strict=True)]
        idx, prompts, replies = (distributed.shard_list(x) for x in (idx, prompts, replies))
        with precision.autocast():
            images = _images(data, idx, cfg.text_only)
            encoded = None if images is None else model.vision.encode(images)
            nll = answer_nll(model, tokenizer, images, prompts, replies, encoded)
            metrics = {"nll": nll.item()}
            loss = nll * (cfg.caption_weight if cfg.stage == "vision" else 1.0)
            if cfg.stage == "vision":
                captions = tokenizer.pad_batch([data.captions[i] for i in idx],
                                               model.text.position_embedding.shape[0])
                image_features = model.image_head(model.vision.pool(*encoded))
                text_features = model.text(captions[0].to(device), captions[1].to(device))
                sig = siglip_loss(image_features, text_features, model.siglip_t,
                                  model.siglip_b)
                loss = loss + sig
                metrics["siglip"] = sig.item()
        return loss, metrics

    def rl_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        generator = step_generator(cfg.seed, step)
        G = cfg.group_size
        idx = torch.randint(len(data), (cfg.prompts_per_step,), generator=generator).tolist()
        mc = torch.rand(cfg.prompts_per_step, generator=generator) < cfg.mc_share
        shift = torch.randint(4, (cfg.prompts_per_step,), generator=generator)
        prompts, truths, options = _rotated(data, idx, mc, shift)
        idx, prompts, truths, options = (distributed.shard_list(x)
                                         for x in (idx, prompts, truths, options))
        rep = [j for j in range(len(idx)) for _ in range(G)]
        images = _images(data, [idx[j] for j in rep], cfg.text_only)
        group_prompts = [prompts[j] for j in rep]
        with precision.autocast():
            replies, ids, mask = answer(model, tokenizer, images, group_prompts,
                                        max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, generator=generator,
                                        sharded=True)
        rewards = reward(replies, [truths[j] for j in rep],
                         [options[j] for j in rep]).to(device)
        completions = [row[:int(n)] for row, n in zip(ids.tolist(), mask.sum(-1), strict=True)]
        with precision.autocast():
            rows = model.rows(images, _encode(tokenizer, group_prompts, bos=True), completions)
            logp = model.answer_logprobs(rows)
        answer_mask = rows.answer[:, 1:]
        old_logp = logp.detach()
        if cfg.rl_loss == "kimi":
            seq = logp.sum(-1).view(-1, G)
            loss = kimi_loss(seq, old_logp.sum(-1).view(-1, G), rewards.view(-1, G), cfg.tau)
            stats = {}
        else:
            ref_logp = None
            if reference is not None:
                with torch.no_grad(), precision.autocast():
                    ref_logp = reference.answer_logprobs(rows)
            advantages = group_advantages(rewards.view(-1, G)).view(-1)
            loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, answer_mask,
                                    cfg.clip_eps, cfg.beta, "grpo", cfg.max_new_tokens)
        return loss, {"reward": rewards.mean().item(),
                      "reply_length": mask.sum(-1).float().mean().item(),
                      "zero_std_frac": (rewards.view(-1, G).std(-1) == 0).float().mean().item(),
                      **{k: v.item() for k, v in stats.items()}}

    def step_fn(step: int) -> dict[str, float]:
        set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, cfg.steps, warmup))
        loss, metrics = (rl_step if cfg.stage == "rl" else supervised_step)(step)
        aux = model.decoder.aux_loss()
        if cfg.balance == "aux" and not cfg.dense:
            loss = loss + aux
            metrics["aux_loss"] = float(aux)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        metrics["grad_norm"] = precision.step(optimizer, model.parameters(), cfg.grad_clip)
        if cfg.balance == "bias" and not cfg.dense:
            model.decoder.update_router_bias()
        metrics["loss"] = loss.item()
        stats = model.decoder.router_stats()
        if "capacity" in stats:
            metrics["capacity"] = stats["capacity"]
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(_held_out_metrics(model, tokenizer, held_out, cfg))
        return metrics

    fit(run, step_fn, total_steps=cfg.steps,
        objects={"model": model, "optimizer": optimizer, "precision": precision},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, progress=progress)
    if distributed.is_main():
        run.write_evaluation(_held_out_metrics(model, tokenizer, held_out, cfg))
        from mlatlas.multimodal.plots import curves_figure

        run.save_figure(curves_figure(run.metrics, cfg.stage), "curves.png")
        export_decoder(run, model, tokenizer)
    return run


def export_decoder(run: Run, model: VLM, tokenizer: Tokenizer) -> Path | None:
    """The decoder as a transformers ``DeepseekV3ForCausalLM`` folder ``RUN/hf-decoder`` (the
    language model alone: image tokens come from this library's tower), with the tokenizer;
    None, with the reason on stderr, for a shape DeepSeek-V3's config cannot express."""
    try:
        directory = save_pretrained(model.decoder, run.path("hf-decoder"),
                                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                    pad_id=tokenizer.pad_id)
    except ConfigError as err:
        print(f"note: vlm: the decoder is not exported to transformers ({err})",
              file=sys.stderr)
        return None
    tokenizer.save_pretrained(directory, model.decoder_cfg.max_seq_len)
    return directory


# evaluation --------------------------------------------------------------------------------------

def _held_out_metrics(model: VLM, tokenizer: Tokenizer, data: VQASet, cfg: Config
                      ) -> dict[str, float]:
    report, open_hits, _ = circular_eval(model, tokenizer, data, cfg.text_only,
                                         max_new_tokens=cfg.max_new_tokens)
    return {"circular": report.overall.circular, "vanilla": report.overall.vanilla,
            "open_accuracy": open_hits.mean().item()}


def circular_eval(model: VLM, tokenizer: Tokenizer, data: VQASet, text_only: bool, *,
                  max_new_tokens: int = 8, batch: int = 256, progress: bool | None = None
                  ) -> tuple[circular.Report, torch.Tensor, list[str]]:
    """CircularEval of ``data``'s questions (every rotation of the options asked; the reply
    matched to an option by :func:`mlatlas.eval.circular.extract_answer`), and the open
    accuracy (the question without options, the reply compared with the answer). Returns the
    report, the open hits (len(data),) and the open replies."""
    questions = to_questions(data)
    passes = circular.circular_passes(questions)
    item = {q.index: i for i, q in enumerate(questions)}
    prompts = [prompt_text(q.question, q.options) for q in passes]
    items = [item[q.g_index] for q in passes]
    replies = _answer_all(model, tokenizer, data, items, prompts, text_only, max_new_tokens,
                          batch)
    extracted = [circular.extract_answer(r, q.options)
                 for r, q in zip(replies, passes, strict=True)]
    open_replies = _answer_all(model, tokenizer, data, list(range(len(data))),
                               [prompt_text(q) for q in data.questions], text_only,
                               max_new_tokens, batch)
    hits = reward(open_replies, data.answers, [None] * len(data))
    return circular.report(passes, extracted), hits, open_replies


def _answer_all(model, tokenizer, data, items, prompts, text_only, max_new_tokens, batch):
    replies = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        replies += answer(model, tokenizer, _images(data, chunk, text_only),
                          prompts[start:start + batch], max_new_tokens=max_new_tokens)[0]
    return replies


def evaluate(run: Run, n: int | None = None, seed: int = 0, progress: bool | None = None,
             options: Options | None = None) -> dict[str, float]:
    """``mlatlas eval RUN``: CircularEval and open accuracy, overall and per category, on ``n``
    generated test questions (None: ``EVAL_QUESTIONS``) at the training sizes and n / 2 at sizes
    never seen in training (``unseen_*``), with ``random_circular`` the uniform guesser's
    (1/N)^N; or, with ``--tsv``, CircularEval of an MMBench TSV."""
    if not (run.dir / MODEL_FILE).is_file():
        raise RunError(f"{run.dir} holds no vision-language model")
    cfg = run.load_config()
    model, tokenizer, text_only = load_vlm(run.dir)
    model.eval()
    if options is not None and options.tsv:
        return _evaluate_tsv(model, tokenizer, text_only, cfg, options, progress)
    n = EVAL_QUESTIONS if n is None else n
    if n < len(CATEGORIES):
        raise ConfigError(f"--n must be at least {len(CATEGORIES)} (one per category), got {n}")
    metrics: dict[str, float] = {}
    for prefix, split, size in (("", "test", n), ("unseen_", "unseen", max(n // 2,
                                                                             len(CATEGORIES)))):
        data = vqa_set(size, seed=1_000 + seed, split=split)
        report, hits, _ = circular_eval(model, tokenizer, data, text_only,
                                        max_new_tokens=cfg.max_new_tokens, progress=progress)
        metrics[f"{prefix}circular"] = report.overall.circular
        metrics[f"{prefix}vanilla"] = report.overall.vanilla
        metrics[f"{prefix}open_accuracy"] = hits.mean().item()
        categories = torch.tensor([CATEGORIES.index(c) for c in data.categories])
        for c, name in enumerate(CATEGORIES):
            acc = report.category[name]
            metrics[f"{prefix}circular_{name}"] = acc.circular
            metrics[f"{prefix}vanilla_{name}"] = acc.vanilla
            metrics[f"{prefix}open_{name}"] = hits[categories == c].mean().item()
        if not prefix:
            metrics["random_circular"] = sum((1 / len(o)) ** len(o) for o in data.options) \
                / len(data)
            if distributed.is_main():
                from mlatlas.multimodal.plots import examples_figure

                run.save_figure(examples_figure(model, tokenizer, data, text_only,
                                                cfg.max_new_tokens), "examples.png")
    run.write_evaluation({**metrics, "questions": n, "seed": seed})
    return metrics


def _evaluate_tsv(model, tokenizer, text_only, cfg, options, progress) -> dict[str, float]:
    from mlatlas.multimodal.plots import image_tensor

    def ask(image, question, choices):
        if not choices:
            raise circular.MMBenchError("a question has no options: CircularEval needs "
                                        "multiple-choice questions (columns A, B, ...)")
        pixels = None if text_only or image is None else [image_tensor(image)]
        if pixels is None and not text_only:
            raise circular.MMBenchError("a question has no image")
        return answer(model, tokenizer, pixels, [prompt_text(question, list(choices.values()))],
                      max_new_tokens=cfg.max_new_tokens)[0][0]

    try:
        report = circular.evaluate(ask, options.tsv, options.results or None, build=None,
                                   progress=progress)
    except (circular.MMBenchError, OSError) as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:  # an image the encoder cannot take: its size or the budget
        raise ConfigError(f"{options.tsv}: {err}") from None
    if report is None:
        return {}
    metrics = {"circular": report.overall.circular, "vanilla": report.overall.vanilla}
    for name, acc in report.category.items():
        metrics[f"circular_{name}"] = acc.circular
    print(report.format())
    return metrics


# sampling ----------------------------------------------------------------------------------------

@dataclass
class Options:
    """Flags of ``mlatlas sample`` (--image, --question) and ``mlatlas eval`` (--tsv,
    --results)."""

    image: str = ""
    """sample: a PNG (or other image) file to ask about; sides multiples of 2 * patch_size."""
    question: str = ""
    """sample: the question about --image (e.g. "how many circles are there?")."""
    tsv: str = ""
    """eval: an MMBench-layout TSV to score under CircularEval instead of generated
    questions."""
    results: str = ""
    """eval: with --tsv, write every pass with its reply, extracted label and hit here."""

    def __post_init__(self) -> None:
        check_options(self)


def sample(run: Run, n: int = 8, seed: int = 0, progress: bool | None = None,
           options: Options | None = None) -> list[str]:
    """``mlatlas sample RUN --image IMG --question Q``: the model's reply; without --image,
    ``n`` generated test questions with the model's reply and the right answer."""
    model, tokenizer, text_only = load_vlm(run.dir)
    cfg = run.load_config()
    model.eval()
    options = options or Options()
    if options.image or options.question:
        if not (options.image and options.question):
            raise ConfigError("give both --image and --question")
        try:
            image = load_image(options.image)
        except ValueError as err:  # not a readable image
            raise ConfigError(str(err)) from None
        patches = (image.shape[-2] // model.encoder_cfg.patch_size) * (
            image.shape[-1] // model.encoder_cfg.patch_size)
        if patches > model.encoder_cfg.max_patches:
            raise ConfigError(f"{options.image}: {image.shape[-2]}x{image.shape[-1]} pixels are "
                              f"{patches} patches, above the budget of "
                              f"{model.encoder_cfg.max_patches} (--max-patches)")
        try:
            replies = answer(model, tokenizer, None if text_only else [image],
                             [prompt_text(options.question.strip().lower())],
                             max_new_tokens=cfg.max_new_tokens)[0]
        except ValueError as err:
            raise ConfigError(f"{options.image}: {err}") from None
        return replies
    data = vqa_set(max(n, len(CATEGORIES)), seed=2_000 + seed, split="test").subset(range(n))
    replies = answer(model, tokenizer, _images(data, range(n), text_only),
                     [prompt_text(q) for q in data.questions],
                     max_new_tokens=cfg.max_new_tokens)[0]
    return [f"{q!r} -> {r!r} (answer {a!r})"
            for q, r, a in zip(data.questions, replies, data.answers, strict=True)]
