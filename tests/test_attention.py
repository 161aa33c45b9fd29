"""The default attention path equals the reference oracle on random packed batches."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gllm.ops import AttentionMetadata, paged_attention, reference_attention, write_kv


def build_batch(seqs: list[tuple[int, int]], kv_heads: int, group: int, dim: int, block_size: int, dtype, seed: int):
    """Random cache and queries for sequences given as (context length, new tokens), decodes first."""
    gen = torch.Generator().manual_seed(seed)
    seqs = sorted(seqs, key=lambda s: s[1] > 1)
    width = max(-(-ctx // block_size) for ctx, _ in seqs)
    num_blocks = len(seqs) * width + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous blocks
    tables, slots, starts = [], [], []
    for i, (ctx, new) in enumerate(seqs):
        table = order[i * width : (i + 1) * width]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - new, ctx)]
    t = sum(new for _, new in seqs)
    q = torch.randn(t, kv_heads * group, dim, generator=gen).to(dtype)
    k = torch.randn(t, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(t, kv_heads, dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(tables),
        seq_lens=torch.tensor([ctx for ctx, _ in seqs]),
        query_lens_list=[new for _, new in seqs],
        seq_lens_list=[ctx for ctx, _ in seqs],
        num_decodes=sum(1 for _, new in seqs if new == 1),
        block_size=block_size,
    )
    write_kv(cache, k, v, meta.slot_mapping)
    return q, cache, meta


seq_st = st.integers(1, 70).flatmap(lambda ctx: st.tuples(st.just(ctx), st.integers(1, ctx)))


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.one_of(seq_st, st.integers(1, 70).map(lambda c: (c, 1))), min_size=1, max_size=6),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([8, 16]),
    block_size=st.sampled_from([4, 16]),
    seed=st.integers(0, 1000),
)
def test_paged_attention_matches_reference(seqs, kv_heads, group, dim, block_size, seed):
    q, cache, meta = build_batch(seqs, kv_heads, group, dim, block_size, torch.float32, seed)
    expected = reference_attention(q, cache, meta, dim**-0.5)
    got = paged_attention(q, cache, meta, dim**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_reference():
    q, cache, meta = build_batch([(37, 1), (5, 1), (64, 20), (16, 16)], 2, 4, 64, 16, torch.bfloat16, 0)
    expected = reference_attention(q, cache, meta, 64**-0.5)
    got = paged_attention(q, cache, meta, 64**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(2, 80).flatmap(lambda c: st.tuples(st.just(c), st.integers(2, min(c, 16)))),
                    min_size=2, max_size=8),
    others=st.lists(st.integers(17, 60).map(lambda c: (c + 20, c)), max_size=2),
    decodes=st.lists(st.integers(1, 50).map(lambda c: (c, 1)), max_size=3),
    kv_heads=st.sampled_from([1, 3]),
    group=st.sampled_from([1, 3]),
    seed=st.integers(0, 1000),
)
def test_short_chunks_batched_like_score_candidates(chunks, others, decodes, kv_heads, group, seed):
    """Many chunks of 2-16 tokens (a score request's candidates) beside decodes and long chunks."""
    seqs = decodes + chunks + others
    q, cache, meta = build_batch(seqs, kv_heads, group, 16, 4, torch.float32, seed)
    torch.testing.assert_close(paged_attention(q, cache, meta, 0.25), reference_attention(q, cache, meta, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_reference_window_sees_the_last_window_positions():
    """A sliding window of 3: the query at position p averages the values of positions p-2..p (equal scores)."""
    q, cache, meta = build_batch([(6, 6)], 1, 1, 4, 4, torch.float32, 0)
    q.zero_()  # every score 0: attention is the mean of the visible values
    values = cache[1, meta.block_tables[0]].reshape(-1, 1, 4)[:6]  # positions 0..5 in order
    out = reference_attention(q, cache, meta, 1.0, window=3)
    for p in range(6):
        torch.testing.assert_close(out[p], values[max(0, p - 2) : p + 1].mean(0))


def test_reference_softcap_squashes_scores():
    """With a soft-cap of 1, a key scored 100 weighs e^tanh(100) times one scored 0, not e^100 times."""
    q, cache, meta = build_batch([(2, 1)], 1, 1, 4, 4, torch.float32, 0)
    block = meta.block_tables[0, 0]
    cache[0, block, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # key of position 0: score 0
    cache[0, block, 1, 0] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # key of position 1: score 100
    q[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    values = cache[1, block, :2, 0]
    out = reference_attention(q, cache, meta, 1.0, softcap=1.0)
    weight = torch.tensor(100.0).tanh().exp()  # the weight of position 1 against position 0's e^0
    torch.testing.assert_close(out[0, 0], (weight * values[1] + values[0]) / (weight + 1))


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.one_of(seq_st, st.integers(1, 70).map(lambda c: (c, 1))), min_size=1, max_size=6),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    block_size=st.sampled_from([4, 16]),
    window=st.sampled_from([None, 1, 5, 16]),
    softcap=st.sampled_from([None, 2.0]),
    seed=st.integers(0, 1000),
)
def test_windows_and_softcaps_match_reference(seqs, kv_heads, group, block_size, window, softcap, seed):
    """Sliding-window layers (windows shorter and longer than a block) and soft-capped scores, on every
    path of the torch backend: decodes, short chunks batched together, long chunks after a prefix."""
    q, cache, meta = build_batch(seqs, kv_heads, group, 8, block_size, torch.float32, seed)
    expected = reference_attention(q * 4, cache, meta, 0.5, window=window, softcap=softcap)
    got = paged_attention(q * 4, cache, meta, 0.5, window=window, softcap=softcap)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
