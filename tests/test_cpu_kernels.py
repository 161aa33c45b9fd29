"""The C++ CPU kernels (``gllm.ops.cpu_kernels``) against their torch twins and the attention oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gllm.model.rope import RotaryEmbedding
from gllm.ops import cpu_kernels, reference_attention
from gllm.ops.attention import decode_attention, paged_attention
from gllm.ops.backend import select_backend
from gllm.ops.elementwise import torch_add_rms_norm, torch_gelu_tanh_mul, torch_rope_write_kv, torch_silu_mul

from test_attention import build_batch

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler to build the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: within a few ulps (sums in another order, contracted products); bfloat16: within 2 ulps of
    the value. One flipped rounding of an intermediate (a sum taken in another order by another CPU's vector
    width) moves it by 1 ulp; a weight of up to 2 that multiplies it after, and the output's own rounding,
    make that up to 2 ulps of the output (seen on an AVX2-only CPU in 2 of 172,800 values)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-6, atol=1e-3)


def test_auto_backend_is_cpu_on_the_cpu() -> None:
    assert select_backend("auto", torch.device("cpu")).name == "cpu"
    with pytest.raises(ValueError, match="CPU device"):
        select_backend("cpu", torch.device("meta"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, dim: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(dim)
    weight = (1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype)
    for tokens in (1, 3, 17, 300):  # 300 rows: split across threads
        x = _randn(tokens, dim + 8, dtype=dtype, gen=gen, scale=3.0)[:, :dim]  # rows with a stride, as a slice
        residual = _randn(tokens, dim, dtype=dtype, gen=gen, scale=10.0) if with_residual else None
        ref_residual = None if residual is None else residual.clone()
        expected, expected_res = torch_add_rms_norm(x, ref_residual, weight, 1e-5)
        out, new_res = cpu_kernels.cpu_add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(new_res, expected_res)
        assert new_res is (x if residual is None else residual)  # in place, or x itself: never a copy
        _assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3])
def test_rope_write_kv_matches_torch(dtype: torch.dtype, head_dim: int, group: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + group)
    kv_heads, num_blocks, block_size = 2, 40, 16
    heads = kv_heads * group
    width = (heads + 2 * kv_heads) * head_dim
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None)
    for tokens in (1, 3, 200):
        qkv = _randn(tokens, width + 40, dtype=dtype, gen=gen, scale=2.0)[:, :width]  # a view, as a matmul slice
        cos, sin = rope.tables(torch.randint(0, 4096, (tokens,), generator=gen), dtype)
        cache = _randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, gen=gen)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        original, expected_cache = cache.clone(), cache.clone()
        expected_q = torch_rope_write_kv(qkv, cos, sin, expected_cache, slots, heads, kv_heads)
        q = cpu_kernels.cpu_rope_write_kv(qkv, cos, sin, cache, slots, heads, kv_heads)
        assert q.shape == (tokens, heads, head_dim) and q.is_contiguous()
        _assert_close(q, expected_q.contiguous())
        _assert_close(cache, expected_cache)
        untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
        untouched[slots] = False
        flat, flat_original = cache.flatten(1, 2), original.flatten(1, 2)  # [2, slots, kv_heads, head_dim]
        assert torch.equal(flat[:, untouched], flat_original[:, untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 1536])
def test_silu_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    for tokens in (1, 3, 17, 300):
        gate_up = _randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=4.0)
        gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamped ends and zero
        _assert_close(cpu_kernels.cpu_silu_mul(gate_up), torch_silu_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 1536])
def test_gelu_tanh_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    """GELU as ``x sigmoid(2u)`` (one ``exp``) against torch's ``0.5 x (1 + tanh(u))``: where tanh rounds to -1
    torch gives exactly 0 and the kernel a value below 1e-5, hence the absolute tolerance in float32."""
    gen = torch.Generator().manual_seed(inter)
    for tokens in (1, 3, 17):
        gate_up = _randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=4.0)
        out, expected = cpu_kernels.cpu_gelu_tanh_mul(gate_up), torch_gelu_tanh_mul(gate_up)
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:
            _assert_close(out, expected)


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 150), min_size=1, max_size=9),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3, 4, 5, 8]),
    dim=st.sampled_from([16, 32, 64, 96, 128, 256]),
    block_size=st.sampled_from([1, 5, 16, 32]),
    window=st.sampled_from([None, None, 1, 7, 40]),
    softcap=st.sampled_from([None, None, 3.0]),
    seed=st.integers(0, 1000),
)
def test_decode_attention_matches_reference(lens, kv_heads, group, dim, block_size, window, softcap, seed):
    """Every supported head size, group sizes that split into chunks of query heads, blocks smaller and
    larger than the kernel's tile of 32 tokens, contexts that end anywhere in a block; sliding windows
    (which start anywhere in a block) and soft-capped scores."""
    q, cache, meta = build_batch([(n, 1) for n in lens], kv_heads, group, dim, block_size, torch.float32, seed)
    q = q * 3  # scores of a few units, so that the soft-cap bends them
    expected = reference_attention(q, cache, meta, dim**-0.5, window=window, softcap=softcap)
    got = cpu_kernels.cpu_paged_attention(q, cache, meta, dim**-0.5, window=window, softcap=softcap)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_decode_attention_bfloat16_and_mixed_batch() -> None:
    """bfloat16 cache and queries (float32 inside); decodes next to prompt chunks, which stay on torch."""
    q, cache, meta = build_batch([(37, 1), (5, 1), (300, 1), (64, 20), (16, 16)], 3, 3, 64, 16, torch.bfloat16, 0)
    expected = reference_attention(q, cache, meta, 64**-0.5)
    got = cpu_kernels.cpu_paged_attention(q, cache, meta, 64**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch_path = paged_attention(q, cache, meta, 64**-0.5)
    assert torch.equal(got[3:], torch_path[3:])  # the prompt chunks: same torch code


def test_decode_attention_large_scores_stay_finite() -> None:
    """Scores in the hundreds (online softmax must subtract the running maximum) and a long context."""
    q, cache, meta = build_batch([(700, 1), (33, 1)], 1, 4, 64, 16, torch.float32, 3)
    q = q * 40
    expected = reference_attention(q, cache, meta, 64**-0.5)
    got = cpu_kernels.cpu_paged_attention(q, cache, meta, 64**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unsupported_shapes_fall_back_to_torch() -> None:
    """A head size the kernel is not compiled for (and float16) gives torch's result, not an error."""
    q, cache, meta = build_batch([(20, 1), (9, 1)], 2, 2, 8, 4, torch.float32, 1)
    args = (q, cache, meta.block_tables, meta.seq_lens, 20, 8**-0.5)
    assert torch.equal(cpu_kernels.cpu_decode_attention(*args), decode_attention(*args))
    x = torch.randn(4, 32, dtype=torch.float16)
    assert torch.equal(cpu_kernels.cpu_silu_mul(x), torch_silu_mul(x))


def test_a_failed_build_is_reported_not_raised(tmp_path) -> None:
    assert cpu_kernels._build("false", tmp_path) is None  # a "compiler" that always fails
    assert not list(tmp_path.glob("*.so"))


def test_a_damaged_build_in_the_cache_is_built_again(tmp_path) -> None:
    compiler = cpu_kernels._compiler()
    built = cpu_kernels._build(compiler, tmp_path)
    built.write_bytes(b"not a library")
    lib = cpu_kernels._load(compiler, tmp_path)
    assert lib is not None and lib.silu_mul_f32 is not None
    assert built.read_bytes() != b"not a library"


def test_engine_on_the_cpu_backend_matches_the_torch_backend(gqa_model) -> None:
    """The whole model on the C++ kernels, prompt chunks and decodes mixed, then prefix-cache hits: same
    greedy tokens and logprobs as on plain torch. Float32: bfloat16 end to end is held to float32 on the
    real model in test_default_model, since this test model's large logits make bfloat16's rounding
    pick other tokens."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    folder, _ = gqa_model
    gen = torch.Generator().manual_seed(4)
    ps = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 30, 45)]
    runs = {}
    for backend in ("torch", "cpu"):
        params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=80, max_num_batched_tokens=24)
        engine = LLMEngine(folder, params, dtype=torch.float32, attention=backend)
        assert engine.attention.name == backend
        first = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=12, temperature=0) for p in ps])
        # the conversations go on: their earlier tokens come from the prefix cache
        more = [p + r.token_ids + [7, 8, 9] for p, r in zip(ps, first)]
        later = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=8, temperature=0) for p in more])
        runs[backend] = first + later
        assert engine.stats()["cached_prompt_tokens"] >= 64 and engine.stats()["kv_blocks_in_use"] == 0
    for a, b in zip(runs["torch"], runs["cpu"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_argmax_logsumexp_matches_torch() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 1003, generator=gen) * 6  # a vocabulary that is no multiple of 16
    logits[1, [40, 7, 900]] = 50.0  # ties: the first index wins, as torch.argmax
    logits[2] = 0.0
    logits[3, 1000] = 60.0  # the maximum in the tail after the last whole vector
    argmax, lse = cpu_kernels.cpu_argmax_logsumexp(logits)
    assert torch.equal(argmax, logits.argmax(dim=-1))
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)
    logits[4, 3] = float("nan")
    assert cpu_kernels.cpu_argmax_logsumexp(logits) is None  # torch's NaN rules apply then
    assert cpu_kernels.cpu_argmax_logsumexp(logits.double()) is None


def test_sampler_gives_the_same_with_and_without_the_kernel(monkeypatch) -> None:
    """Greedy and sampled rows, seeded, with top-n: the one-pass statistics change nothing visible."""
    from gllm.sample import sampler as sampler_module
    from gllm.sample.sampler import Sampler, SamplingRow

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 2000, generator=gen) * 4
    logits[0, [11, 12]] = 30.0  # a greedy tie

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def rows():
        return [
            SamplingRow(temperature=0.0, num_logprobs=3),
            SamplingRow(temperature=1.0, top_k=50, generator=seeded(1)),
            SamplingRow(temperature=0.7, top_p=0.9, generator=seeded(2)),
            SamplingRow(temperature=0.0),
            SamplingRow(temperature=1.5, num_logprobs=5, generator=seeded(3)),
        ]

    fast = Sampler(0)(logits, rows())
    monkeypatch.setattr(sampler_module, "cpu_argmax_logsumexp", lambda logits: None)
    plain = Sampler(0)(logits, rows())
    assert fast.token_ids == plain.token_ids and fast.ranks == plain.ranks
    assert fast.token_ids[0] == 11
    assert max(abs(a - b) for a, b in zip(fast.logprobs, plain.logprobs)) < 1e-5
    for a, b in zip(fast.top_logprobs, plain.top_logprobs):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b))
