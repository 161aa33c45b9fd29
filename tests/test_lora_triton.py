"""The Triton kernels of mixed-adapter rows (``gllm.lora.triton_lora``) against the torch path, under
Triton's CPU interpreter: the kernels alone, and a whole engine whose attention runs on Triton."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernels on the CPU

import pytest
import torch

pytest.importorskip("triton")

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.lora import grouped, triton_lora  # noqa: E402
from gllm.lora.adapter import SitePart, SiteUpdate  # noqa: E402
from gllm.ops.backend import triton_available  # noqa: E402
from lora_fixtures import make_adapter  # noqa: E402
from test_lora import PROMPTS  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="no GPU and no Triton interpreter")


def stacked_update(adapters: int, d_in: int, parts: list[tuple[int, int]], dtype, gen) -> SiteUpdate:
    """A random stacked site: ``parts`` as (rank width, output columns), side by side in the output."""
    total = sum(w for w, _ in parts)
    a = torch.randn(adapters, d_in, total, generator=gen).to(dtype)
    col = out = 0
    update_parts = []
    for width, columns in parts:
        b = torch.randn(adapters, width, columns, generator=gen).to(dtype) * 0.1
        update_parts.append(SitePart(slice(out, out + columns), slice(col, col + width), b))
        col, out = col + width, out + columns
    return SiteUpdate(a, update_parts)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_kernels_add_each_row_s_own_adapter_like_the_torch_path(dtype, tolerance):
    """Three adapters, rows of each scattered through the batch (one has three rows, one none at some
    step), two rows under no adapter: the kernels change each adapter row by its own update, and nothing
    else."""
    gen = torch.Generator().manual_seed(0)
    update = stacked_update(3, 96, [(8, 80), (24, 48), (8, 48)], dtype, gen)  # a fused q/k/v-like site
    x = torch.randn(9, 96, generator=gen).to(dtype)
    base = torch.randn(9, 176, generator=gen).to(dtype)
    by_adapter = [[4, 0, 7], [2], [5, 8]]  # rows 1, 3 and 6 have no adapter
    expected, got = base.clone(), base.clone()
    grouped.MixedRows({"site": update}, by_adapter, torch.device("cpu")).apply(update, x, expected)
    grouped.MixedRows({"site": update}, by_adapter, torch.device("cpu"), triton=True).apply(update, x, got)
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= tolerance * scale
    assert torch.equal(got[[1, 3, 6]], base[[1, 3, 6]])
    # each row against its own adapter, computed plainly in float64
    for k, rows in enumerate(by_adapter):
        for row in rows:
            u = x[row].double() @ update.a[k].double()
            for part in update.parts:
                want = base[row, part.out].double() + u[part.cols] @ part.b[k].double()
                assert (got[row, part.out].double() - want).abs().max() <= tolerance * scale


def test_an_engine_on_triton_runs_mixed_adapter_rows_through_the_kernels(gqa_model, tmp_path, monkeypatch):
    """Two adapters and none in one batch, on an engine whose attention runs on Triton: the mixed decode
    rows go through the kernels, and every row's tokens and logprobs are those of the torch engine."""
    folder, hf = gqa_model
    make_adapter(hf, tmp_path / "a", seed=2)
    make_adapter(hf, tmp_path / "b", seed=3, targets=["q_proj", "v_proj", "down_proj"], r=8, alpha=4)
    launches = []
    real = triton_lora.triton_add_updates
    monkeypatch.setattr(triton_lora, "triton_add_updates", lambda *args: launches.append(1) or real(*args))
    params = GeneratorParams(block_size=8, max_batch_size=8, max_seq_len=128, max_num_batched_tokens=48)
    requests = [GenerationRequest(prompt_token_ids=p, max_new_tokens=6, temperature=0, adapter=name)
                for p in PROMPTS[:2] for name in ("a", "b", None)]  # fmt: skip
    runs = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(folder, params, device="cpu", dtype=torch.float32, attention=backend,
                           adapters={"a": tmp_path / "a", "b": tmp_path / "b"})  # fmt: skip
        assert engine.adapters.triton == (backend == "triton")
        runs[backend] = engine.generate(requests)
    assert launches  # the Triton engine's mixed rows went through the kernels
    for ours, reference in zip(runs["triton"], runs["torch"]):
        assert ours.token_ids == reference.token_ids
        assert max(abs(a - b) for a, b in zip(ours.logprobs, reference.logprobs)) < 1e-4
