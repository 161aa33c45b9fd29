"""The grouped low-rank products of a mixed batch against a plain per-row loop, for every row layout the
runner can hand them: one row per adapter in stack order, several rows per adapter, rows out of order,
large groups beside small ones, rows without an adapter, and adapters of different ranks and targets; in
float64 (torch's batched products) and in float32 and bfloat16 (the C++ kernels of ``lora_rows.cpp``)."""

from __future__ import annotations

import functools

import pytest
import torch

from gllm.config import ModelConfig
from gllm.lora.adapter import SITES, LoraAdapter, projection_shapes
from gllm.lora.files import LoraPair, LoraTensors
from gllm.lora import grouped
from gllm.lora.grouped import LARGE_GROUP, LoraBatch, StackCache
from gllm.ops import cpu_kernels

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=8)
SHAPES = projection_shapes(CONFIG)


def adapter(seed: int, rank: int, targets: tuple[str, ...], dtype: torch.dtype = torch.float64) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for module, (out, inp) in SHAPES.items():
        if module.rsplit(".", 1)[-1] in targets:
            pairs[module] = LoraPair(torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen),
                                     scale=0.5)
    return LoraAdapter(f"a{seed}", LoraTensors(f"test-{seed}", pairs), CONFIG, dtype, torch.device("cpu"))


@functools.cache
def adapters(dtype: torch.dtype) -> tuple[LoraAdapter, ...]:
    return (adapter(0, 4, ("q_proj", "v_proj", "down_proj"), dtype), adapter(1, 8, ("k_proj", "o_proj", "up_proj"), dtype),
            adapter(2, 2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), dtype))


A, B, C = 0, 1, 2  # in LAYOUTS: which of ``adapters(dtype)``
LAYOUTS = {  # spans: (adapter, rows) per chunk, in packed order
    "one row each, stack order": [(A, 1), (B, 1), (C, 1)],
    "several rows per adapter": [(A, 1), (A, 1), (B, 1), (C, 1), (C, 1), (C, 1)],
    "rows out of order, base rows between": [(B, 1), (None, 1), (A, 1), (B, 2), (None, 3), (C, 1), (A, 1)],
    "a large group beside decodes": [(A, 1), (C, 1), (B, LARGE_GROUP + 3), (None, 2)],
    "one adapter only": [(C, 1), (None, 1), (C, 1)],
}


def reference(site: str, spans, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row plus its own adapter's update for every projection of the site, one row at a time."""
    out = y.clone()
    layer_site = site.split(".", 2)[2]
    row = 0
    for adapter_, n in spans:
        for r in range(row, row + n):
            if adapter_ is None:
                continue
            start = 0
            for proj in SITES[layer_site]:
                width = SHAPES[f"model.layers.0.{proj}"][0]
                update = adapter_.sites.get(site)
                for part in update.parts if update is not None else ():
                    if part.out.start == start:
                        out[r, part.out] += x[r] @ update.a[:, part.cols] @ part.b
                start += width
        row += n
    return out


TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's size


@pytest.mark.parametrize("dtype", TOLERANCES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_products_equal_a_per_row_loop(layout, dtype, monkeypatch):
    kernel_calls = []
    real = grouped.cpu_lora_rows
    monkeypatch.setattr(grouped, "cpu_lora_rows", lambda *args: kernel_calls.append(real(*args)) or kernel_calls[-1])
    mine = adapters(dtype)
    spans = [(None if a is None else mine[a], n) for a, n in LAYOUTS[layout]]
    exact = [(None if a is None else adapters(torch.float64)[a], n) for a, n in LAYOUTS[layout]]
    rows = sum(n for _, n in spans)
    batch = LoraBatch(spans, StackCache(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    for site in [f"layers.0.{s}" for s in SITES]:
        inp = SHAPES[f"model.layers.0.{SITES[site.split('.', 2)[2]][0]}"][1]
        out = sum(SHAPES[f"model.layers.0.{p}"][0] for p in SITES[site.split(".", 2)[2]])
        x = torch.randn(rows, inp, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(rows, out, generator=gen, dtype=torch.float64).to(dtype)
        want = reference(site, exact, x.double(), y.double())  # the same inputs, summed in float64
        got = batch.apply(site, x, y.clone()).double()
        assert (got - want).abs().max() <= TOLERANCES[dtype] * want.abs().max()
    mixed = batch.mixed is not None
    if dtype != torch.float64 and mixed and cpu_kernels.available():
        assert kernel_calls and all(kernel_calls)  # the C++ kernels took the mixed rows
    else:
        assert not any(kernel_calls)
