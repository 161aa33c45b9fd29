"""Exact replay: a seeded ``deterministic`` request gives the same tokens, and the same logprobs to the
bit, alone or in any batch, in the engine's default dtype on the CPU.

The batches are drawn by hypothesis: 1, 6 or 15 other requests of random lengths and settings, some
sharing the target's prefix (so it may start from blocks others computed), some deterministic too,
arriving at random steps (so the target's prompt is cut into other chunks), in a cache small enough that
requests are preempted and recomputed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

TARGET_PROMPT = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(5)).tolist()


def target(prompt: list[int] = TARGET_PROMPT, n: int = 24, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=prompt, max_new_tokens=n, temperature=0.8, top_p=0.9, seed=1234,
                             logprobs=2, ignore_eos=True, deterministic=True, **kw)


def run(engine: LLMEngine, arrivals: list[tuple[int, GenerationRequest]]) -> dict[str, tuple]:
    """Add each request at its step; run to the end; tokens and logprobs by request id."""
    results, step, pending = {}, 0, sorted(arrivals, key=lambda a: a[0])
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.add_request(pending.pop(0)[1])
        for r in engine.step().finished:
            assert r.finish_reason == "length" and r.error is None, r.error
            results[r.request_id] = (r.token_ids, r.logprobs, [t for tops in r.top_logprobs for t in tops])
        step += 1
    return results


other_request = st.builds(
    lambda length, shared, temperature, det, seed, n: GenerationRequest(
        prompt_token_ids=(TARGET_PROMPT[:shared] + torch.randint(0, 256, (length,), generator=torch.Generator()
                                                                    .manual_seed(seed)).tolist())[:90] or [1],
        max_new_tokens=n, temperature=temperature, deterministic=det, seed=seed, ignore_eos=True),
    length=st.integers(1, 60), shared=st.sampled_from([0, 0, 9, 17, 29]), temperature=st.sampled_from([0.0, 0.7, 1.0]),
    det=st.booleans(), seed=st.integers(0, 10_000), n=st.integers(1, 30))


@pytest.fixture(scope="module")
def replay_engine(gqa_model):
    folder, _ = gqa_model
    params = GeneratorParams(block_size=4, max_batch_size=16, max_seq_len=160, num_kv_blocks=150,
                             max_num_batched_tokens=48)
    engine = LLMEngine(folder, params)  # the default dtype
    alone = run(engine, [(0, target(request_id="alone"))])["alone"]
    return engine, alone


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([2, 7, 16]), others=st.lists(st.tuples(st.integers(0, 6), other_request), min_size=15,
                                                        max_size=15), at=st.integers(0, 4), position=st.integers(0, 15))
def test_seeded_deterministic_request_replays_in_any_batch(replay_engine, size, others, at, position):
    engine, alone = replay_engine
    engine.block_manager.pool.clear_cache()  # others may then compute the shared prefix before the target
    arrivals = [(step, req) for step, req in others[: size - 1]]
    arrivals.insert(min(position, len(arrivals)), (at, target(request_id="target")))
    results = run(engine, arrivals)
    assert results["target"] == alone
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_default_model_replays_in_batches_of_2_7_and_16():
    """The same on the default model, in its default dtype, with a chat prompt and sampled crowds."""
    engine = LLMEngine("smollm2-135m-instruct", GeneratorParams(max_batch_size=16, max_seq_len=512,
                                                                max_num_batched_tokens=256))
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Which road leads to the old mill?"}])
    alone = run(engine, [(0, target(chat, 12, request_id="alone"))])["alone"]
    gen = torch.Generator().manual_seed(3)
    for size in (2, 7, 16):
        engine.block_manager.pool.clear_cache()
        crowd = [(int(torch.randint(0, 3, (1,), generator=gen)), GenerationRequest(
            prompt_token_ids=chat[: int(torch.randint(0, len(chat), (1,), generator=gen))]
            + torch.randint(0, 49152, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist(),
            max_new_tokens=int(torch.randint(1, 16, (1,), generator=gen)), temperature=0.7, ignore_eos=True))
            for _ in range(size - 1)]
        crowd.insert(size // 2, (1, target(chat, 12, request_id="target")))
        assert run(engine, crowd)["target"] == alone, size
