"""Tokenizers for the tiny language model: one token per character, or BPE trained locally.

Both are ``tokenizers`` models (so they save as ``tokenizer.json`` and load in transformers as a
``PreTrainedTokenizerFast``) with four special tokens, ``<pad>`` ``<bos>`` ``<eos>`` ``<unk>`` at
ids 0-3. A prompt is encoded as ``<bos> x_1 .. x_n`` and a completion as ``y_1 .. y_m <eos>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mlatlas.core.config import ConfigError
from mlatlas.core.io import write_json, write_text

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIAL_TOKENS))


class Tokenizer:
    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, backend):
        self.backend = backend

    @classmethod
    def characters(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per distinct character of ``texts``."""
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        alphabet = sorted(set("".join(texts)))
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
        backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        return cls._finish(backend)

    @classmethod
    def bpe(cls, texts: Iterable[str], vocab_size: int = 64) -> Tokenizer:
        """Byte-pair merges (Sennrich et al. 2016) learnt from ``texts`` alone."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import models, trainers

        texts = list(texts)
        backend = Backend(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=sorted(set("".join(texts))),
                                      show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls._finish(backend)

    @classmethod
    def _finish(cls, backend) -> Tokenizer:
        from tokenizers import decoders, processors

        backend.add_special_tokens(list(SPECIAL_TOKENS))
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

    def describe(self) -> str:
        model = json.loads(self.backend.to_str())["model"]["type"]
        return f"{model} tokenizer, {self.vocab_size} tokens"
