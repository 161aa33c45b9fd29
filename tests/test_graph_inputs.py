"""The host side of a CUDA-graph decode step, on the CPU: ``DecodeGraphs.run`` stages each step's inputs
into the static buffers that the captured graph reads, then replays the graph of the right size."""

from __future__ import annotations

import types

import torch

from gllm.graphs import DecodeGraphs, graph_batch_sizes


def staged_graphs(max_batch: int = 16, width: int = 6, scratch_block: int = 99, block_size: int = 4) -> DecodeGraphs:
    """A DecodeGraphs with CPU buffers and fake graphs that record which size was replayed."""
    g = DecodeGraphs.__new__(DecodeGraphs)
    g.sizes = graph_batch_sizes(max_batch)
    g.scratch_slot = scratch_block * block_size
    g.input_ids = torch.full((max_batch,), -1, dtype=torch.int64)
    g.positions = torch.full((max_batch,), -1, dtype=torch.int64)
    g.slots = torch.full((max_batch,), -1, dtype=torch.int64)
    g.seq_lens = torch.full((max_batch,), -1, dtype=torch.int64)
    g.tables = torch.full((max_batch, width), scratch_block, dtype=torch.int64)
    g.replayed = []
    g.graphs = {s: types.SimpleNamespace(replay=lambda s=s: g.replayed.append(s)) for s in g.sizes}
    g.outputs = {s: torch.arange(s * 3, dtype=torch.float32).view(s, 3) for s in g.sizes}
    return g


def test_inputs_land_in_the_static_buffers_with_padding_rows_on_the_scratch_slot():
    g = staged_graphs()
    ids, positions, slots = [11, 12, 13], [5, 40, 7], [21, 162, 31]
    tables = [[5, 1, 0], [3, 8, 2], [9, 4, 0]]
    logits = g.run(ids, positions, slots, tables)
    assert g.replayed == [4]  # 3 decodes run in the graph captured for 4
    assert logits.shape == (3, 3) and torch.equal(logits, g.outputs[4][:3])
    assert g.input_ids[:3].tolist() == ids
    assert g.positions[:4].tolist() == positions + [0]
    assert g.seq_lens[:4].tolist() == [6, 41, 8, 1]
    assert g.slots[:4].tolist() == slots + [g.scratch_slot]
    assert g.tables[:3, :3].tolist() == tables


def test_input_ids_already_on_the_device_are_copied_in():
    g = staged_graphs()
    samples = torch.tensor([7, 8, 9, 10, 11])  # the previous step's samples, never on the host
    tables = [[i, i + 1] for i in range(5)]
    g.run(samples, [3, 4, 5, 6, 7], [12, 17, 22, 27, 32], tables)
    assert g.replayed == [8]
    assert g.input_ids[:5].tolist() == samples.tolist()
    assert g.positions[:8].tolist() == [3, 4, 5, 6, 7, 0, 0, 0]
    assert g.slots[5:8].tolist() == [g.scratch_slot] * 3
    assert g.tables[:5, :2].tolist() == tables
