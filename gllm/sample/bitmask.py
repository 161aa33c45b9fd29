"""Allowed tokens per row, as bits: how constrained output reaches the sampler.

The layout is the one llguidance and xgrammar fill: a row of int32 words, bit ``j`` of word ``w``
allowing token ``32 * w + j`` (words little-endian, as on every CPU and GPU torch runs on). The sampler
only ever sees these bits; where they come from (a grammar, a list of choices) is not its business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# _BITS[b, i]: is bit i of byte value b set (bytes hold tokens 8k .. 8k + 7, lowest bit first).
_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


@dataclass
class TokenBitmask:
    """The allowed tokens of some rows of a batch: ``words[i]`` is the mask of row ``rows[i]``."""

    rows: list[int]
    words: torch.Tensor  # int32 [len(rows), words per row]

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """``[len(rows), vocab_size]`` booleans; tokens past the words' end are not allowed."""
        table = _BITS.to(device)
        as_bytes = self.words.to(device).contiguous().view(torch.uint8)
        bits = table[as_bytes.long()].reshape(len(self.rows), -1)
        if bits.shape[1] < vocab_size:
            bits = torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
        return bits[:, :vocab_size]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits [B, V]`` with the tokens its masked rows do not allow set to ``-inf``."""
        allowed = self.allowed(logits.shape[1], logits.device)
        if self.rows == list(range(logits.shape[0])):  # every row masked: one pass, no copy first
            return torch.where(allowed, logits, float("-inf"))
        index = torch.tensor(self.rows, device=logits.device)
        return logits.index_copy(0, index, torch.where(allowed, logits.index_select(0, index), float("-inf")))
