"""Engine behaviour on a tiny random model: preemption, seeds, priorities, aborts, async API, bad input."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

DEVICE = os.environ.get("GLLM_TEST_DEVICE", "cpu")


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(5, 60, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]


def greedy(ids: list[int], n: int = 20, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=ids, max_new_tokens=n, temperature=0, **kw)


def test_preemption_keeps_greedy_tokens(gqa_model):
    folder, _ = gqa_model
    ps = prompts(6)
    big = LLMEngine(folder, GeneratorParams(block_size=4, max_batch_size=6, max_seq_len=128), device=DEVICE, dtype=torch.float32)
    expected = [r.token_ids for r in big.generate([greedy(p) for p in ps])]
    small = LLMEngine(folder, GeneratorParams(block_size=4, max_batch_size=6, max_seq_len=128, num_kv_blocks=24), device=DEVICE, dtype=torch.float32)
    got = small.generate([greedy(p) for p in ps])
    assert small.stats()["preemptions"] > 0
    assert [r.token_ids for r in got] == expected
    assert small.stats()["kv_blocks_in_use"] == 0


def test_seeded_request_is_independent_of_the_batch(gqa_model):
    folder, _ = gqa_model
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_batch_size=8, max_seq_len=128), device=DEVICE, dtype=torch.float32)
    p = prompts(1, seed=9)[0]
    req = lambda: GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234)  # noqa: E731
    alone = engine.generate([req()])[0]
    crowd = [GenerationRequest(prompt_token_ids=q, max_new_tokens=30, temperature=1.0) for q in prompts(5, seed=4)]
    busy = engine.generate(crowd[:2] + [req()] + crowd[2:])[2]
    assert busy.token_ids == alone.token_ids
    other_seed = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0.9, seed=99)])[0]
    assert other_seed.token_ids != alone.token_ids


def test_logprobs_ranks_and_top_alternatives(gqa_model):
    folder, hf = gqa_model
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_seq_len=128), device=DEVICE, dtype=torch.float32)
    p = prompts(1, seed=5)[0]
    r = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=6, temperature=1.0, seed=7, logprobs=3)])[0]
    ids = torch.tensor([p + r.token_ids])
    with torch.no_grad():
        logp = hf(ids).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
    for i, tok in enumerate(r.token_ids):
        assert abs(r.logprobs[i] - logp[i, tok].item()) < 1e-4
        assert r.ranks[i] == 1 + int((logp[i] > logp[i, tok]).sum())
        top = logp[i].topk(3)
        assert [t for t, _ in r.top_logprobs[i]] == top.indices.tolist()


def test_priority_runs_first_and_abort_frees_blocks(gqa_model):
    folder, _ = gqa_model
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_batch_size=1, max_seq_len=128), device=DEVICE, dtype=torch.float32)
    p = prompts(3)
    low = engine.add_request(greedy(p[0], 10, priority=0))
    high = engine.add_request(greedy(p[1], 10, priority=5))
    victim = engine.add_request(greedy(p[2], 100, priority=9))
    order = []
    for _ in range(3):
        engine.step()
    engine.abort(victim)
    engine.abort(victim)  # idempotent
    engine.abort("no-such-request")
    while engine.has_work():
        order += [r.request_id for r in engine.step().finished]
    assert order == [victim, high, low]
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_async_future_and_stream(gqa_model):
    folder, _ = gqa_model
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_seq_len=128), device=DEVICE, dtype=torch.float32)
    p = prompts(2)

    async def main():
        fut = engine.enqueue_request(greedy(p[0], 12))
        deltas = [d async for d in engine.stream(greedy(p[1], 12))]
        result = await fut
        # leaving a stream early aborts its request
        async for _ in engine.stream(greedy(p[1], 50)):
            break
        await asyncio.sleep(0.2)
        return result, deltas

    result, deltas = asyncio.run(main())
    direct = engine.generate([greedy(p[0], 12), greedy(p[1], 12)])
    assert result.token_ids == direct[0].token_ids
    assert [d.token_id for d in deltas] == direct[1].token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    while engine.has_work():
        engine.step()
    assert engine.stats()["kv_blocks_in_use"] == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(prompt_token_ids=[]), "empty"),
        (dict(prompt_token_ids=[1] * 200), "max_seq_len"),
        (dict(prompt_token_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_token_ids=[1, 2], max_new_tokens=-3), "max_new_tokens"),
        (dict(prompt_token_ids=[1, 2], top_p=0.0), "top_p"),
        (dict(prompt_token_ids=[1, 2], top_p=1.5), "top_p"),
        (dict(prompt_token_ids=[1, 2], top_k=-1), "top_k"),
        (dict(prompt_token_ids=[1, 2], temperature=-0.5), "temperature"),
        (dict(prompt_token_ids=[1, 9999]), "vocabulary"),
        (dict(prompt="hello"), "tokenizer"),
        (dict(), "exactly one"),
    ],
)
def test_bad_requests_fail_clearly_and_change_nothing(gqa_model, bad, message):
    folder, _ = gqa_model
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_seq_len=128), device=DEVICE, dtype=torch.float32)
    good = engine.add_request(greedy(prompts(1)[0], 8))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(GenerationRequest(**bad))
    finished = []
    while engine.has_work():
        finished += engine.step().finished
    assert [r.request_id for r in finished] == [good] and len(finished[0].token_ids) == 8
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_unknown_model_and_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        LLMEngine("no-such-model")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="broken.gguf"):
        LLMEngine(bad)
