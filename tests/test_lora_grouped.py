"""The grouped low-rank products of a mixed batch against a plain per-row loop, for every row layout the
runner can hand them: one row per adapter in stack order, several rows per adapter, rows out of order,
large groups beside small ones, rows without an adapter, and adapters of different ranks and targets."""

from __future__ import annotations

import pytest
import torch

from gllm.config import ModelConfig
from gllm.lora.adapter import SITES, LoraAdapter, projection_shapes
from gllm.lora.files import LoraPair, LoraTensors
from gllm.lora.grouped import LARGE_GROUP, LoraBatch, StackCache

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=8)
SHAPES = projection_shapes(CONFIG)


def adapter(seed: int, rank: int, targets: tuple[str, ...]) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for module, (out, inp) in SHAPES.items():
        if module.rsplit(".", 1)[-1] in targets:
            pairs[module] = LoraPair(torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen),
                                     scale=0.5)
    return LoraAdapter(f"a{seed}", LoraTensors(f"test-{seed}", pairs), CONFIG, torch.float64, torch.device("cpu"))


ADAPTERS = [adapter(0, 4, ("q_proj", "v_proj", "down_proj")), adapter(1, 8, ("k_proj", "o_proj", "up_proj")),
            adapter(2, 2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
A, B, C = ADAPTERS
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_products_equal_a_per_row_loop(layout):
    spans = LAYOUTS[layout]
    rows = sum(n for _, n in spans)
    batch = LoraBatch(spans, StackCache(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    for site in [f"layers.0.{s}" for s in SITES]:
        inp = SHAPES[f"model.layers.0.{SITES[site.split('.', 2)[2]][0]}"][1]
        out = sum(SHAPES[f"model.layers.0.{p}"][0] for p in SITES[site.split(".", 2)[2]])
        x = torch.randn(rows, inp, generator=gen, dtype=torch.float64)
        y = torch.randn(rows, out, generator=gen, dtype=torch.float64)
        want = reference(site, spans, x, y)
        torch.testing.assert_close(batch.apply(site, x, y.clone()), want, rtol=1e-12, atol=1e-12)
