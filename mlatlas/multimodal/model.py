"""The vision-language model: MoonViT tokens spliced into the MoE decoder's input (Kimi-VL).

An image I of H x W pixels becomes (H / p)(W / p) patch tokens in the packed encoder, then
(H / 2p)(W / 2p) tokens of the decoder's width after the 2x2 pixel shuffle and the projector
(:mod:`mlatlas.multimodal.vision`). A row of the decoder's batch reads

    [pad .. pad] <bos> v_1 .. v_n q_1 .. q_m | a_1 .. a_k <eos> [pad .. pad]

with the image tokens v in place of token embeddings, the prompt q (a question, its options
for a multiple-choice question, then "answer:") and the answer a. Prompts are left-padded
(generation continues them) and answers right-padded, so a padded row computes what the row
alone would; training maximises the answer's likelihood given image and prompt,

    L = -(1 / sum_i |a_i|) sum_i sum_t log p_theta(a_{i,t} | v_i, q_i, a_{i,<t}),

the token mean of the supervised stages (captions are answers to the prompt "caption:").
The rows are laid out by index arithmetic over the whole batch (no loop over rows): column j
of row i is <bos>, image token, prompt token or answer token according to where j falls
between the row's start and its boundaries.

A text-only model of the same shape (``text_only``) reads the same rows without the image
tokens: the baseline that shows how much the answers depend on the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mlatlas.contrastive.text import TextTower
from mlatlas.llm.common import pad
from mlatlas.multimodal.decoder import DecoderConfig, MoEDecoder
from mlatlas.multimodal.vision import EncoderConfig, Packed, VisionTower
from mlatlas.nn.tokenizers import Tokenizer

CAPTION_PROMPT = "caption:"


def prompt_text(question: str, options: Sequence[str] = ()) -> str:
    """The prompt of a question: the question, its options as "A. text" lines when it is
    multiple-choice, then "answer:"."""
    lines = [question, *(f"{chr(65 + j)}. {o}" for j, o in enumerate(options)), "answer:"]
    return "\n".join(lines)


@dataclass
class Rows:
    """A batch laid out for the decoder: ``embeds`` (B, T, D), ``mask`` (B, T) real tokens,
    ``ids`` (B, T) the token ids (the bos id on image tokens), ``answer`` (B, T) the answer
    tokens' positions; ``prefix`` is the width of the left-padded part (bos, image, prompt)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor
    answer: torch.Tensor
    prefix: int


class VLM(nn.Module):
    """MoonViT + projector + MoE decoder, and the SigLIP text tower of the vision stage
    (``text``; its temperature t' and bias b as ``siglip_t`` and ``siglip_b``)."""

    def __init__(self, encoder: EncoderConfig, decoder: DecoderConfig, text_width: int = 64,
                 text_len: int = 48):
        super().__init__()
        self.encoder_cfg, self.decoder_cfg = encoder, decoder
        self.vision = VisionTower(encoder, decoder.dim)
        self.decoder = MoEDecoder(decoder)
        self.text = TextTower(decoder.vocab_size, text_len, width=text_width, depth=1,
                              heads=4, pool="mean")
        self.image_head = nn.Linear(encoder.width, text_width)
        self.siglip_t = nn.Parameter(torch.tensor(10.0).log())
        self.siglip_b = nn.Parameter(torch.tensor(-10.0))

    @property
    def device(self) -> torch.device:
        return self.siglip_b.device

    def rows(self, images: Sequence[torch.Tensor] | None, prompt_ids: list[list[int]],
             answer_ids: list[list[int]] | None = None,
             encoded: tuple[torch.Tensor, Packed] | None = None) -> Rows:
        """Lay out B rows: ``images`` B tensors (3, H, W), or None for text only;
        ``prompt_ids`` the prompts' ids with <bos> first; ``answer_ids`` the answers' ids with
        <eos> last (None: prompts only, for generation); ``encoded`` the images' encoder
        tokens if already computed (``self.vision.encode(images)``)."""
        device = self.device
        B = len(prompt_ids)
        if images is not None and len(images) != B:
            raise ValueError(f"{len(images)} images for {B} prompts")
        answer_ids = answer_ids if answer_ids is not None else [[] for _ in range(B)]
        if images is None:
            image_tokens = torch.zeros(0, self.decoder_cfg.dim, device=device)
            n_img = torch.zeros(B, dtype=torch.long, device=device)
        else:
            encoded = encoded or self.vision.encode([im.to(device) for im in images])
            image_tokens, cu = self.vision.project(*encoded)
            n_img = cu.diff().to(device)
            img_start = cu[:-1].to(device)
        P = torch.tensor([len(p) for p in prompt_ids], device=device)
        A = torch.tensor([len(a) for a in answer_ids], device=device)
        prompts = pad(prompt_ids, Tokenizer.pad_id, False, device)[0]  # <bos> in column 0
        answers = pad(answer_ids, Tokenizer.pad_id, False, device)[0]
        prefix = P + n_img
        width = int(prefix.max())
        T = width + int(A.max())
        j = torch.arange(T, device=device)[None] - (width - prefix)[:, None]  # offset in row
        n = n_img[:, None]
        is_bos = j == 0
        is_image = (j >= 1) & (j < 1 + n)
        is_prompt = (j >= 1 + n) & (j < prefix[:, None])
        is_answer = (j >= prefix[:, None]) & (j < (prefix + A)[:, None])
        # A prompt token at offset j is prompts[i, j - n]; an answer token answers[i, j - prefix].
        prompt_col = (j - n).clamp(0, prompts.shape[1] - 1)
        answer_col = (j - prefix[:, None]).clamp(0, max(answers.shape[1] - 1, 0))
        ids = torch.where(is_prompt | is_bos, prompts.gather(1, prompt_col),
                          torch.full_like(j, Tokenizer.pad_id))
        if answers.shape[1]:
            ids = torch.where(is_answer, answers.gather(1, answer_col), ids)
        ids = torch.where(is_image, torch.full_like(j, Tokenizer.bos_id), ids)
        embeds = self.decoder.embed(ids)
        if images is not None:
            rows_i, cols = is_image.nonzero(as_tuple=True)
            source = img_start[rows_i] + j[rows_i, cols] - 1
            embeds = embeds.index_put((rows_i, cols), image_tokens[source].to(embeds.dtype))
        mask = is_bos | is_image | is_prompt | is_answer
        return Rows(embeds, mask.long(), ids, is_answer, width)

    def answer_logprobs(self, rows: Rows) -> torch.Tensor:
        """log p(a_t | image, prompt, a_<t) at every answer token: (B, T - 1), 0 elsewhere
        (column t scores the token of column t + 1)."""
        logits = self.decoder(inputs_embeds=rows.embeds, attention_mask=rows.mask)[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, rows.ids[:, 1:, None])[..., 0]
        return logp * rows.answer[:, 1:]

