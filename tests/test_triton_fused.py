"""The fused Triton kernels (RMSNorm, RoPE + KV write, SiLU * up) against their torch twins (interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernels on the CPU

import pytest
import torch

pytest.importorskip("triton")

from gllm.model.rope import RotaryEmbedding  # noqa: E402
from gllm.ops.backend import triton_available  # noqa: E402
from gllm.ops.elementwise import (  # noqa: E402
    torch_add_rms_norm,
    torch_gelu_tanh_mul,
    torch_rope_write_kv,
    torch_silu_mul,
)
from gllm.ops.triton_fused import (  # noqa: E402
    triton_add_rms_norm,
    triton_rope_write_kv,
    triton_gelu_tanh_mul,
    triton_silu_mul,
)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(not triton_available(), reason="no GPU and no Triton interpreter")


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two 16-bit tensors (their bit patterns, ordered)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.cpu().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _assert_nearly_exact(out: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: within 1e-6 relative; 16-bit: all but 0.1% (or 2) bit-equal, the rest 2 ulps off at most.

    A float32 last-bit difference (RMSNorm's sum order; numpy's exp in the interpreter) now and then flips an
    intermediate rounding by 1 ulp, which the next product (the weight, ``up``) can widen to 2.
    """
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-30)
        return
    ulps = _ulps(out, expected)
    assert ulps.max().item() <= 2
    assert (ulps != 0).sum().item() <= max(2, ulps.numel() // 1000)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 576, 2048])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, dim: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(dim)
    weight = (1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype).to(DEVICE)
    outs, expected_outs = [], []
    for tokens in (1, 3, 17):
        x = _randn(tokens, dim, dtype=dtype, gen=gen, scale=3.0)
        residual = _randn(tokens, dim, dtype=dtype, gen=gen, scale=10.0) if with_residual else None
        ref_residual = None if residual is None else residual.clone()
        expected, expected_res = torch_add_rms_norm(x, ref_residual, weight, 1e-5)
        out, new_res = triton_add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(new_res, expected_res)
        assert new_res is (x if residual is None else residual)  # in place, or x itself: never a copy
        assert out.data_ptr() not in (x.data_ptr(), new_res.data_ptr())
        outs.append(out)
        expected_outs.append(expected)
    _assert_nearly_exact(torch.cat(outs), torch.cat(expected_outs))  # a row's rare flips come several at once


def test_add_rms_norm_residual_is_rounded_sum() -> None:
    """The new residual is ``x + residual`` rounded once to the dtype, as torch's add; ``x`` is untouched."""
    gen = torch.Generator().manual_seed(7)
    x = _randn(5, 96, dtype=torch.bfloat16, gen=gen)
    residual = _randn(5, 96, dtype=torch.bfloat16, gen=gen, scale=100.0)
    x_before, expected = x.clone(), x + residual
    triton_add_rms_norm(x, residual, torch.ones(96, dtype=torch.bfloat16, device=DEVICE), 1e-6)
    assert torch.equal(residual, expected) and torch.equal(x, x_before)


def _cache_and_slots(tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """A random cache and ``tokens`` distinct slots scattered over its blocks in shuffled order."""
    num_blocks, block_size = 7, 16
    cache = _randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, gen=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    return cache, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_rope_write_kv_matches_torch(dtype: torch.dtype, head_dim: int, group: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + group)
    kv_heads = 2
    heads = kv_heads * group
    width = (heads + 2 * kv_heads) * head_dim
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None).to(DEVICE)
    for tokens in (1, 3, 17):
        qkv = _randn(tokens, width + 40, dtype=dtype, gen=gen, scale=2.0)[:, :width]  # a view, as a matmul slice
        positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)
        cos, sin = rope.tables(positions, dtype)
        cache, slots = _cache_and_slots(tokens, kv_heads, head_dim, dtype, gen)
        original, expected_cache = cache.clone(), cache.clone()
        expected_q = torch_rope_write_kv(qkv, cos, sin, expected_cache, slots, heads, kv_heads)
        q = triton_rope_write_kv(qkv, cos, sin, cache, slots, heads, kv_heads)
        assert q.shape == (tokens, heads, head_dim) and q.is_contiguous()
        assert torch.equal(q, expected_q)
        assert torch.equal(cache, expected_cache)
        untouched = torch.ones(cache[0, :, :, 0, 0].numel(), dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        flat, flat_original = cache.flatten(1, 2), original.flatten(1, 2)  # [2, slots, kv_heads, head_dim]
        assert torch.equal(flat[:, untouched], flat_original[:, untouched])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_write_kv_head_dim_96_flat_tables(dtype: torch.dtype) -> None:
    """A head_dim whose half is no power of two (padded and masked), and cos / sin given as ``[T, D/2]``."""
    gen = torch.Generator().manual_seed(96)
    tokens, heads, kv_heads, head_dim = 5, 3, 1, 96
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, gen=gen)
    cos, sin = RotaryEmbedding(head_dim, 512, 500000.0, None).to(DEVICE).tables(torch.arange(5, 10).to(DEVICE), dtype)
    cache, slots = _cache_and_slots(tokens, kv_heads, head_dim, dtype, gen)
    expected_cache = cache.clone()
    q = triton_rope_write_kv(qkv, cos[:, 0], sin[:, 0], cache, slots, heads, kv_heads)
    assert torch.equal(q, torch_rope_write_kv(qkv, cos, sin, expected_cache, slots, heads, kv_heads))
    assert torch.equal(cache, expected_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 576, 2048])
def test_silu_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    gate_ups = [_randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=4.0) for tokens in (1, 3, 17)]
    outs = torch.cat([triton_silu_mul(gate_up) for gate_up in gate_ups])
    _assert_nearly_exact(outs, torch.cat([torch_silu_mul(gate_up) for gate_up in gate_ups]))  # exact on CUDA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 2048])
def test_gelu_tanh_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    """Gemma's gate, in torch's order of operations (libdevice's tanh on CUDA, tanh from exp in the interpreter)."""
    gen = torch.Generator().manual_seed(inter)
    gate_ups = [_randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=4.0) for tokens in (1, 3, 17)]
    outs = torch.cat([triton_gelu_tanh_mul(gate_up) for gate_up in gate_ups])
    expected = torch.cat([torch_gelu_tanh_mul(gate_up) for gate_up in gate_ups])
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    torch.testing.assert_close(outs.float(), expected.float(), rtol=tol, atol=tol)


def test_empty_batches_launch_nothing() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    out, res = triton_add_rms_norm(x, None, torch.ones(64, device=DEVICE), 1e-5)
    assert out.shape == (0, 64) and res is x
    cache = torch.zeros(2, 2, 16, 1, 64, device=DEVICE)
    cos = torch.empty(0, 1, 32, device=DEVICE)
    q = triton_rope_write_kv(torch.empty(0, 4 * 64, device=DEVICE), cos, cos, cache, cos.long()[:, 0, 0], 2, 1)
    assert q.shape == (0, 2, 64) and not cache.any()
    assert triton_silu_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_the_triton_backend_matches_the_torch_backend(gqa_model, dtype: torch.dtype) -> None:
    """The whole model with every Triton kernel in it (fused steps, prompt-chunk and decode attention) and
    overlapped decoding: same greedy tokens as the torch backend, prompt chunks and decodes mixed."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    folder, _ = gqa_model
    gen = torch.Generator().manual_seed(4)
    ps = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 30)]
    runs = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(folder, GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=64, max_num_batched_tokens=24),
                           device=DEVICE, dtype=dtype, attention=backend, overlap=backend == "triton")  # fmt: skip
        assert engine.attention.name == backend
        runs[backend] = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=6, temperature=0) for p in ps])
    for a, b in zip(runs["torch"], runs["triton"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < (1e-4 if dtype == torch.float32 else 0.1)
