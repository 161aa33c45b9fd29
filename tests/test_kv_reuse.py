"""KV reuse on a tiny random model: prefix cache, forks (copy on write), prompt logprobs and scoring."""

from __future__ import annotations

import os

import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = rand_ids(300, 0)


DEVICE = os.environ.get("GLLM_TEST_DEVICE", "cpu")


def engine(folder, caching=True, **kw) -> LLMEngine:
    params = dict(block_size=16, max_batch_size=4, max_seq_len=512, enable_prefix_caching=caching)
    params.update(kw)
    return LLMEngine(folder, GeneratorParams(**params), device=DEVICE, dtype=torch.float32)


def greedy(ids, new=12, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=ids, max_new_tokens=new, temperature=0, **kw)


def test_shared_prefix_is_computed_once(gqa_model):
    folder, _ = gqa_model
    a, b = PREFIX + rand_ids(9, 1), PREFIX + rand_ids(23, 2)
    cached = engine(folder)
    cached.generate([greedy(a)])
    before = cached.stats()["computed_tokens"]
    result = cached.generate([greedy(b)])[0]
    assert result.num_cached_tokens == 288  # 18 full blocks of the 300-token prefix
    # Only the rest of the prompt, then one token per decode step after the first sample.
    assert cached.stats()["computed_tokens"] - before == len(b) - 288 + 11
    assert cached.stats()["cached_prompt_tokens"] == 288
    plain = engine(folder, caching=False)
    assert plain.generate([greedy(b)])[0].token_ids == result.token_ids
    assert plain.generate([greedy(b)])[0].num_cached_tokens == 0


def test_identical_prompt_still_computes_its_last_token(gqa_model):
    folder, _ = gqa_model
    e = engine(folder)
    first = e.generate([greedy(PREFIX[:64])])[0]
    again = e.generate([greedy(PREFIX[:64])])[0]
    assert again.num_cached_tokens == 48  # stops before the last token's block, which must give logits
    assert again.token_ids == first.token_ids


def test_cache_after_eviction_and_preemption(gqa_model):
    folder, _ = gqa_model
    prompts = [PREFIX[:200] + rand_ids(30, 10 + i) for i in range(5)]
    expected = [r.token_ids for r in engine(folder, caching=False).generate([greedy(p, 20) for p in prompts])]
    # 40 blocks: not enough for 5 requests of ~15 blocks at once -> preemption, and cached blocks evicted.
    small = engine(folder, num_kv_blocks=40, max_batch_size=5)
    got = small.generate([greedy(p, 20) for p in prompts])
    assert [r.token_ids for r in got] == expected
    assert small.stats()["preemptions"] > 0
    small.generate([greedy(rand_ids(400, 99), 20)])  # evicts most of the cached prefix
    assert small.stats()["cache_evictions"] > 0
    again = small.generate([greedy(prompts[0], 20)])[0]
    assert again.token_ids == expected[0]
    assert small.stats()["kv_blocks_in_use"] == 0


def test_forks_share_the_prompt_and_copy_on_write(gqa_model):
    folder, _ = gqa_model
    prompt = PREFIX[:37]  # not a multiple of the block size: the last block is shared, then copied
    e = engine(folder)
    single = e.generate([greedy(prompt, 16)])[0]
    e2 = engine(folder, caching=False)
    before = e2.stats()
    forked = e2.generate([greedy(prompt, 16, n=4)])[0]
    assert len(forked.forks) == 4 and forked.forks[0] is forked
    assert all(f.token_ids == single.token_ids for f in forked.forks)
    # The prompt was computed once for all four forks.
    assert e2.stats()["computed_tokens"] - before.get("computed_tokens", 0) == len(prompt) + 4 * 15
    assert e2.stats()["block_copies"] == 3  # three of the four copied the shared, partly filled block
    assert e2.stats()["kv_blocks_in_use"] == 0

    sampled = e2.generate([GenerationRequest(prompt_token_ids=prompt, max_new_tokens=16, temperature=1.0, seed=7, n=3)])[0]
    outs = [f.token_ids for f in sampled.forks]
    assert len({tuple(o) for o in outs}) == 3  # different seeds differ
    for i, out in enumerate(outs):  # fork i is exactly the request with seed 7 + i
        alone = e2.generate([GenerationRequest(prompt_token_ids=prompt, max_new_tokens=16, temperature=1.0, seed=7 + i)])[0]
        assert alone.token_ids == out
    assert e2.stats()["kv_blocks_in_use"] == 0


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1 under the HF model."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_prompt_logprobs_match_hf(gqa_model):
    folder, hf = gqa_model
    prompt = PREFIX[:70]
    e = engine(folder, max_num_batched_tokens=32)  # chunked prompt
    r = e.generate([greedy(prompt, 4, prompt_logprobs=True)])[0]
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == 70
    expected = hf_logprobs(hf, prompt)
    assert torch.allclose(torch.tensor(r.prompt_logprobs[1:]), expected, atol=1e-4)


def test_scores_match_hf_loglikelihood(gqa_model):
    folder, hf = gqa_model
    prompt = PREFIX[:45]
    cands = [[5], [17, 3], rand_ids(4, 5), [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [5]]
    e = engine(folder)
    before = e.stats().get("computed_tokens", 0)
    result = e.score(ScoreRequest(prompt_token_ids=prompt, candidates=cands))
    # The prompt once, then each candidate's tokens but its last.
    assert e.stats()["computed_tokens"] - before == len(prompt) + sum(len(c) - 1 for c in cands)
    assert [c.token_ids for c in result.candidates] == cands
    for c in result.candidates:
        expected = hf_logprobs(hf, prompt + c.token_ids)[len(prompt) - 1 :]
        assert torch.allclose(torch.tensor(c.token_logprobs), expected, atol=1e-4)
        assert abs(c.logprob - sum(c.token_logprobs)) < 1e-9
    assert result.candidates[0].logprob == result.candidates[-1].logprob
    assert e.stats()["kv_blocks_in_use"] == 0
