"""The CLIP byte-pair-encoding tokenizer shared by the SD1 and SD2 text encoders.

Wraps open_clip's `SimpleTokenizer` and the BPE vocabulary file open_clip ships, so nothing is
downloaded. Text is cleaned (ftfy, HTML unescape, whitespace collapse) and lower-cased, as both
the HF tokenizer used by SD1 and open_clip's tokenizer used by SD2 do.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from ldm.errors import UserError


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    """One shared BPE tokenizer (loading the merges takes a noticeable fraction of a second)."""
    return SimpleTokenizer(default_bpe(), context_length=None)


class CLIPTokenizer:
    """Turns prompts into fixed-length rows `[SOT, tokens..., EOT, pad...]` of CLIP token ids.

    `pad_with_eot=True` pads with the end-of-text id (49407), as SD1's HF tokenizer does;
    `pad_with_eot=False` pads with 0, as SD2's open_clip tokenizer does. Prompts longer than
    `max_length - 2` tokens are truncated so that the last position holds EOT.
    """

    def __init__(self, max_length: int = 77, *, pad_with_eot: bool):
        if max_length < 2:
            raise UserError(f"max_length must be at least 2 (room for start and end tokens), got {max_length}")
        self._bpe = _bpe()
        self.max_length = max_length
        self.pad_with_eot = pad_with_eot
        self.sot_token_id: int = self._bpe.sot_token_id
        self.eot_token_id: int = self._bpe.eot_token_id
        self.pad_token_id: int = self.eot_token_id if pad_with_eot else 0
        self.vocab_size: int = self._bpe.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string to tokenize, got {type(text).__name__}")
        return self._bpe.encode(text)

    def token_count(self, text: str) -> int:
        """How many tokens `text` takes (1 for a word that is a single vocabulary entry)."""
        return len(self.encode(text))

    def decode_token(self, token_id: int) -> str:
        """The BPE piece of one id; a piece that ends a word carries the '</w>' suffix."""
        return self._bpe.decoder[int(token_id)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a token row: the start token is skipped and decoding stops at the first end token."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects one row of token ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        body = []
        for i in ids:
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                body.append(int(i))
        return self._bpe.decode(body).strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Token ids of a batch of prompts, shape (len(texts), max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in zip(rows, texts):
            ids = [self.sot_token_id, *self.encode(text)[: self.max_length - 2], self.eot_token_id]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows
