"""AttentionMetadata: how a packed batch of variable-length token chunks maps onto the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExactRows:
    """Packed rows whose attention must not depend on the batch (exact replay): each is computed alone, as
    one query over its own context, the same way whether it is a decode or a token of a prompt chunk."""

    rows: torch.Tensor  # [R] int64: packed row of each
    block_tables: torch.Tensor  # [R, max_blocks] int64: its sequence's blocks
    seq_lens: torch.Tensor  # [R] int64: its context length (its position + 1)
    seq_lens_list: list[int]


@dataclass
class AttentionMetadata:
    """Describes one packed batch of ``T`` new tokens from ``B`` sequences.

    Sequences are ordered decodes first: the first ``num_decodes`` sequences bring exactly one new token
    each (a decode step, or a one-token prompt chunk), the rest bring prompt chunks of any length. Each
    sequence's new tokens sit at the end of its context: a chunk of ``q`` tokens in a sequence of
    ``seq_len`` tokens occupies positions ``seq_len - q .. seq_len - 1``.

    Tensors live on the model's device; the ``*_list`` mirrors are plain Python ints so that per-sequence
    loops (prompt chunks) do not force device-to-host copies.
    """

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64: cache blocks of each sequence, padded with 0
    seq_lens: torch.Tensor  # [B] int64: context length of each sequence after this step
    query_lens_list: list[int]  # [B]: new tokens of each sequence
    seq_lens_list: list[int]  # [B]: same as seq_lens
    num_decodes: int  # the first num_decodes sequences have one new token each
    block_size: int
    query_starts: torch.Tensor | None = None  # [B + 1] int64: packed row of each sequence's first new token
    exact: ExactRows | None = None  # rows computed again, one query at a time (``AttentionBackend.attention``)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes
