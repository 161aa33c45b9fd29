"""CUDA graphs for decode steps: one captured forward per batch size, replayed with new inputs.

A decode step of a small model is mostly kernel-launch overhead; replaying a captured graph launches the
whole forward at once. Inputs live in static buffers that each replay reads: a batch of ``n`` decodes is
padded to the next captured size, and the padding rows write their K/V into a scratch block that no
sequence owns. Attention must not depend on host-side lengths, so graphs are captured with the longest
possible context (``max_len``) and the kernels read each sequence's true length from ``seq_lens``.
"""

from __future__ import annotations

import array

import torch

from gllm.model import LlamaModel
from gllm.ops import AttentionMetadata


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to ``max_batch``."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += range(16, max_batch + 1, 16)
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[torch.Tensor],
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_len: int,
    ):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_len = max_len
        self.scratch_slot = scratch_block * block_size
        self.sizes = graph_batch_sizes(max_batch)
        dev = kv_caches[0].device
        width = -(-max_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((max_batch,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.tables = torch.full((max_batch, width), scratch_block, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int64, device=dev)
        self.rows = torch.arange(max_batch, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self.graphs[size], self.outputs[size] = self._capture(size, pool)
            pool = self.graphs[size].pool()

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:n],
            block_tables=self.tables[:n],
            seq_lens=self.seq_lens[:n],
            query_lens_list=[1] * n,
            seq_lens_list=[self.max_len] * n,
            num_decodes=n,
            block_size=self.block_size,
        )

    def _run(self, n: int) -> torch.Tensor:
        return self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, self._meta(n), self.rows[:n])

    def _capture(self, n: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                self._run(n)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self._run(n)
        return graph, out

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def run(
        self, input_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """Replay the graph for ``len(positions)`` decodes; returns their logits ``[n, vocab]``.

        ``input_ids`` may already be on the device (the previous step's samples, not yet seen by the host).
        """
        n = len(positions)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        width = len(tables[0])
        # One host-to-device copy per step: the per-row scalars (padding rows point at the scratch block)
        # and the block tables, packed in one int64 buffer (array.array: no Python int -> tensor loop).
        # From pinned memory the copy does not wait for the work already queued (the previous step may
        # still run).
        on_host = isinstance(input_ids, list)
        flat = array.array("q", positions)
        flat.extend([0] * pad)
        flat.extend(slots)
        flat.extend([self.scratch_slot] * pad)
        if on_host:
            flat.extend(input_ids)
            flat.extend([0] * pad)
        for table in tables:
            flat.extend(table)
        host = torch.frombuffer(flat, dtype=torch.int64)
        if self.input_ids.is_cuda:
            host = torch.empty(len(flat), dtype=torch.int64, pin_memory=True).copy_(host)
        packed = host.to(self.input_ids.device, non_blocking=True)
        rows = packed[: (3 if on_host else 2) * size].view(-1, size)
        self.positions[:size].copy_(rows[0])
        self.slots[:size].copy_(rows[1])
        self.seq_lens[:size].copy_(rows[0] + 1)
        self.input_ids[:n].copy_(rows[2, :n] if on_host else input_ids)
        self.tables[:n, :width].copy_(packed[rows.numel() :].view(n, width))
        self.graphs[size].replay()
        return self.outputs[size][:n]
