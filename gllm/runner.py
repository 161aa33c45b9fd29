"""ModelRunner: turns a schedule into one packed batch, runs the model, returns the logits to sample.

The runner owns the model and the KV cache memory. It knows nothing of requests beyond what a chunk
says: which tokens to compute, where they sit in their sequence, and which blocks hold the sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gllm.graphs import DecodeGraphs
from gllm.lora import AdapterRegistry, LoraAdapter
from gllm.model import LlamaModel
from gllm.ops import AttentionMetadata
from gllm.ops.invariant import RowPlan, invariant_products
from gllm.ops.metadata import ExactRows


@dataclass
class BatchChunk:
    """The part of one sequence computed in a step."""

    token_ids: list[int]  # the new tokens
    start: int  # position of the first new token
    block_table: list[int]
    num_logits: int  # how many of the last new tokens need logits (1: sampling; all: logprobs of given tokens)
    exact: bool = False  # batch-invariant: attention one query at a time, products under ``exact_plan``
    adapter: LoraAdapter | None = None  # the LoRA adapter of the sequence, if any


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphs | None = None
        self.exact_plan: RowPlan | None = None  # products' shapes in steps with exact chunks (gllm.ops.invariant)
        self.adapters: AdapterRegistry | None = None  # set once adapters may be used (``gllm.lora``)

    def capture_graphs(self, scratch_block: int, max_batch: int, max_len: int) -> None:
        """Capture CUDA graphs for decode batches; ``scratch_block`` is a cache block no sequence owns."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, scratch_block, max_batch, max_len)

    def prepare(self, chunks: list[BatchChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Pack the chunks (one-token chunks first) into input ids, positions, metadata and logits rows."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        query_lens, seq_lens = [], []
        exact_rows, exact_seqs = [], []
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            if c.exact:
                exact_rows += range(len(input_ids), len(input_ids) + n)
                exact_seqs += [i] * n
            input_ids += c.token_ids
            span = range(c.start, c.start + n)
            positions += span
            slots += [c.block_table[p // bs] * bs + p % bs for p in span]
            logits_rows += range(len(input_ids) - c.num_logits, len(input_ids))
            query_lens.append(n)
            seq_lens.append(c.start + n)
        width = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]
        num_decodes = next((i for i, q in enumerate(query_lens) if q > 1), len(query_lens))
        dev = self.device
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            num_decodes=num_decodes,
            block_size=bs,
            query_starts=torch.tensor(starts, dtype=torch.int64, device=dev),
        )
        if exact_rows:
            lens = [positions[r] + 1 for r in exact_rows]
            meta.exact = ExactRows(torch.tensor(exact_rows, device=dev),
                                   meta.block_tables.index_select(0, torch.tensor(exact_seqs, device=dev)),
                                   torch.tensor(lens, dtype=torch.int64, device=dev), lens)
        return (
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )

    def _graphable(self, chunks: list[BatchChunk]) -> bool:
        return self.graphs.fits(len(chunks)) and all(
            len(c.token_ids) == 1 and c.num_logits == 1 and not c.exact and c.adapter is None for c in chunks
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write of forked sequences) in every layer's cache."""
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for kv in self.kv_caches:
            kv.index_copy_(1, dst, kv.index_select(1, src))

    def execute(
        self, chunks: list[BatchChunk], copies: list[tuple[int, int]] = (), input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the chunks' K/V into the cache; return float32 logits of the rows the chunks asked for.

        ``input_ids``: the new tokens already on the device (one per chunk, all decodes); then the
        chunks' own ``token_ids`` are placeholders.
        """
        if copies:
            self.copy_blocks(list(copies))
        if self.graphs is not None and self._graphable(chunks):
            bs = self.block_size
            width = max(len(c.block_table) for c in chunks)
            return self.graphs.run(
                [c.token_ids[0] for c in chunks] if input_ids is None else input_ids,
                [c.start for c in chunks],
                [c.block_table[c.start // bs] * bs + c.start % bs for c in chunks],
                [c.block_table + [0] * (width - len(c.block_table)) for c in chunks],
            )
        ids, positions, meta, logits_rows = self.prepare(chunks)
        spans = [(c.adapter, len(c.token_ids)) for c in chunks]
        adapters = contextlib.nullcontext() if self.adapters is None else self.adapters.rows(spans)
        with adapters, invariant_products(self.exact_plan if meta.exact is not None else None):
            return self.model(ids if input_ids is None else input_ids, positions, self.kv_caches, meta, logits_rows)
