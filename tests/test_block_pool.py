"""Property tests of the block pool, block manager and scheduler: no leak, no double free, all finish."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gllm.engine.scheduler import Scheduler
from gllm.engine.sequence import Sequence, Status
from gllm.kv import BlockManager, BlockPool, NoFreeBlocksError
from gllm.sample import SamplingRow


def check_pool(pool: BlockPool, tables: list[list[int]]) -> None:
    """Every block's reference count equals its number of holders; free blocks are exactly those unheld.
    (A released block leaves the scratch block's id, ``pool.num_blocks``, which no one holds.)"""
    holders = Counter(b for table in tables for b in table if b != pool.num_blocks)
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == holders[block], f"block {block}"
    assert pool.num_in_use == len(holders)


def test_pool_basics():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert {a, b, c} == {0, 1, 2}
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    pool.free(b)
    assert pool.allocate() == b
    pool.free(a)
    with pytest.raises(RuntimeError):
        pool.free(a)


def test_cached_blocks_are_evicted_least_recently_freed_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    table: list[int] = []
    manager.grow(table, 5)
    keys: list = []
    manager.commit(table, keys, tokens, 5)
    assert len(keys) == 2 and manager.pool.num_cached == 2
    first, second = table[0], table[1]
    manager.free(table)
    hit, _ = manager.match_prefix(tokens)
    assert hit == [first, second]
    manager.free(hit)
    # Plain free blocks go first, then cached ones: the tail of the prefix before its head.
    order = [manager.pool.allocate() for _ in range(4)]
    assert order[2:] == [second, first]
    assert manager.pool.num_cached == 0


tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=24)  # tiny alphabet: prefixes repeat


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "grow", "free", "fork"]), tokens_st, st.integers(0, 10)), max_size=60),
       caching=st.booleans())
def test_block_manager_invariants(ops, caching):
    manager = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=caching)
    live: list[tuple[list[int], list, list[int], int]] = []  # table, keys, tokens, computed
    for op, tokens, pick in ops:
        if op == "add":
            table, keys = manager.match_prefix(tokens)
            computed = len(table) * 4
            assert computed <= len(tokens) - 1
            for b, k in zip(table, keys):
                assert manager.pool.keys[b] == k  # a shared cached block holds what its key says
            if manager.can_grow(table, len(tokens)):
                manager.grow(table, len(tokens))
                manager.commit(table, keys, tokens, len(tokens))
                live.append((table, keys, tokens, len(tokens)))
            else:
                manager.free(table)
        elif op == "grow" and live:
            table, keys, tokens, _ = live[pick % len(live)]
            tokens.append(pick % 3)
            if manager.can_grow(table, len(tokens), len(tokens) - 1):
                copies = manager.grow(table, len(tokens), len(tokens) - 1)
                target = table[(len(tokens) - 1) // 4]
                # A write lands only in a block nobody else holds and no cache entry describes.
                assert manager.pool.ref_counts[target] == 1 and manager.pool.keys[target] is None
                assert all(dst == target for _, dst in copies)
                manager.commit(table, keys, tokens, len(tokens))
            else:
                tokens.pop()
        elif op == "fork" and live:
            table, keys, tokens, computed = live[pick % len(live)]
            child: list[int] = []
            manager.share(table, child)
            live.append((child, list(keys), list(tokens), computed))
        elif op == "free" and live:
            table, *_ = live.pop(pick % len(live))
            manager.free(table)
        check_pool(manager.pool, [t for t, *_ in live])
        for table, keys, tokens, _ in live:
            for i, key in enumerate(keys):
                assert key.token_ids == tuple(tokens[i * 4 : (i + 1) * 4])
                if manager.pool.keys[table[i]] is not None:
                    assert manager.pool.keys[table[i]] == key
    for table, *_ in live:
        manager.free(table)
    assert manager.pool.num_in_use == 0 and manager.pool.num_free == 12


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2)), min_size=1, max_size=12),
    abort_every=st.integers(0, 7),
    num_blocks=st.integers(7, 30),
    budget=st.integers(4, 64),
    window=st.sampled_from([None, None, 1, 5, 9]),
)
def test_scheduler_finishes_everything_without_leaks(arrivals, abort_every, num_blocks, budget, window):
    """Random arrivals, aborts and a small pool (forcing preemption): every request ends, no block leaks.
    With a window (a model whose every layer is local), blocks behind it are released as sequences pass
    them, prefix-cache hits included, and every block the window still reaches is held."""
    manager = BlockManager(num_blocks=num_blocks, block_size=4, window=window)
    scheduler = Scheduler(manager, max_batch_size=4, token_budget=budget)
    seqs = []
    for i, (prompt_len, new, prio) in enumerate(arrivals):
        max_tokens = prompt_len + new
        while manager.peak_blocks(max_tokens, budget) > num_blocks:  # what the engine admits
            max_tokens -= 1
        if prompt_len >= max_tokens:
            continue
        seq = Sequence(f"r{i}", [i % 3] * prompt_len, prompt_len, max_tokens, SamplingRow(0.0), prio, arrival=i)
        seqs.append(seq)
    pending = list(seqs)
    for step in range(5000):
        if pending and step % 2 == 0:
            scheduler.add(pending.pop(0))
        if abort_every and step % abort_every == abort_every - 1 and scheduler.running:
            scheduler.finish(scheduler.running[-1], "aborted")
        plan = scheduler.schedule()
        assert plan.num_tokens <= budget
        assert len(scheduler.running) <= 4
        sampled = {c.seq: 7 for c in plan.chunks if c.samples}
        scheduler.update(plan, sampled)
        check_pool(manager.pool, [s.block_table for s in scheduler.running])
        for s in scheduler.running:
            assert len(s.block_table) * 4 >= s.num_computed_tokens
            first_seen = 0 if window is None else max(0, s.num_computed_tokens - window + 1)
            released = [i for i, b in enumerate(s.block_table) if b == manager.released]
            assert released == list(range((first_seen // 4) if window else 0))
        if not pending and not scheduler.has_work():
            break
    assert all(s.status is Status.FINISHED for s in seqs)
    assert manager.pool.num_in_use == 0
    for s in seqs:
        if s.finish_reason == "length":
            assert s.num_tokens == s.max_tokens
