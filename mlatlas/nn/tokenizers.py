"""Tokenizers, the one implementation every family uses: one token per character, or byte-pair
merges (Sennrich et al. 2016) learnt from the run's own texts, so nothing is downloaded.

Both are ``tokenizers`` models, so they save as ``tokenizer.json`` and load in transformers as a
``PreTrainedTokenizerFast``. Every tokenizer has the same four special tokens at the same ids,

    <pad> = 0,  <bos> = 1,  <eos> = 2,  <unk> = 3,

and a method may add its own after them (BLIP's ``<enc>``, id 4, marks the grounded encoder's
first token). The language model encodes a prompt as ``<bos> x_1 .. x_n`` and a completion as
``y_1 .. y_m <eos>``; a caption tower reads fixed-length rows ``<bos> w_1 .. w_n <eos> <pad> ..``
(:meth:`Tokenizer.pad_batch`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mlatlas.core.config import ConfigError
from mlatlas.core.io import write_json, write_text

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIAL_TOKENS))


class Tokenizer:
    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, backend):
        self.backend = backend

    @classmethod
    def characters(cls, texts: Iterable[str], extra_special: Sequence[str] = ()) -> Tokenizer:
        """One token per distinct character of ``texts``."""
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        alphabet = sorted(set("".join(texts)))
        specials = [*SPECIAL_TOKENS, *extra_special]
        vocab = {tok: i for i, tok in enumerate(specials)}
        vocab.update({ch: len(specials) + i for i, ch in enumerate(alphabet)})
        backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        return cls._finish(backend, specials, words=False)

    @classmethod
    def bpe(cls, texts: Iterable[str], vocab_size: int = 64, *, words: bool = False,
            extra_special: Sequence[str] = ()) -> Tokenizer:
        """Byte-pair merges learnt from ``texts`` alone. With ``words`` the texts are
        lower-cased and split on whitespace and punctuation first (captions), and decoding puts
        a space between tokens; without it merges may cross spaces (arithmetic text)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        texts = list(texts)
        specials = [*SPECIAL_TOKENS, *extra_special]
        backend = Backend(models.BPE(unk_token="<unk>"))
        # Without word splitting every character of the texts, spaces included, must be a token;
        # split into words, the trainer's own alphabet (of the words) is the right one.
        alphabet = []
        if words:
            backend.normalizer = normalizers.Lowercase()
            backend.pre_tokenizer = pre_tokenizers.Whitespace()
        else:
            alphabet = sorted(set("".join(texts)))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=alphabet, show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls._finish(backend, specials, words)

    @classmethod
    def _finish(cls, backend, specials: list[str], words: bool) -> Tokenizer:
        from tokenizers import decoders, processors

        backend.add_special_tokens(specials)
        # Word-split tokens are joined by spaces (the library's default); the others are pieces
        # of one string and are fused back together.
        if not words:
            backend.decoder = decoders.Fuse()
        # transformers' tokenizer(prompt) then prepends <bos> as ours does.
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS)])
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # the Rust error names neither file nor problem plainly
            raise ConfigError(f"cannot read tokenizer {path}: {err}") from None
        if any(backend.token_to_id(t) != i for i, t in enumerate(SPECIAL_TOKENS)):
            raise ConfigError(f"{path} lacks the special tokens {SPECIAL_TOKENS} at ids 0-3")
        return cls(backend)

    def token_id(self, token: str) -> int:
        """The id of a special token a method added (``"<enc>"``)."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"the tokenizer has no token {token!r}")
        return token_id

    def save(self, path: str | Path) -> None:
        write_text(path, self.backend.to_str())

    def save_pretrained(self, directory: str | Path, max_length: int) -> None:
        """``tokenizer.json`` + ``tokenizer_config.json`` for ``AutoTokenizer.from_pretrained``."""
        directory = Path(directory)
        self.save(directory / "tokenizer.json")
        write_json(directory / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "padding_side": "left", "clean_up_tokenization_spaces": False})

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=bos).ids

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=bos)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, special tokens left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        return self.backend.decode_batch(rows, skip_special_tokens=True)

    def pad_batch(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (N, max_len): ``<bos>`` tokens ``<eos>`` then ``<pad>``; ``mask``
        is True on real tokens. Texts longer than ``max_len`` - 2 tokens are cut."""
        body = max_len - 2
        rows = [[BOS, *row[:body], EOS] for row in self.encode_batch(list(texts))]
        ids = torch.full((len(rows), max_len), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return ids, ids != PAD

    def decode_padded(self, ids: torch.Tensor) -> list[str]:
        """Texts of (N, L) rows, each read up to its first ``<eos>``, special tokens skipped."""
        rows = []
        for row in ids.tolist():
            rows.append(row[:row.index(EOS)] if EOS in row else row)
        return self.decode_batch(rows)

    def describe(self) -> str:
        model = json.loads(self.backend.to_str())["model"]["type"]
        return f"{model} tokenizer, {self.vocab_size} tokens"
