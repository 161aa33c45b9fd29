"""LoRA adapters per request against HF + peft on a tiny random model: single requests, mixed batches."""

from __future__ import annotations

import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from lora_fixtures import hf_greedy, make_adapter

NEW_TOKENS = 16
PROMPTS = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 23, 40)]


def engine(folder, **adapters) -> LLMEngine:
    params = GeneratorParams(block_size=8, max_batch_size=8, max_seq_len=128, max_num_batched_tokens=48)
    return LLMEngine(folder, params, device="cpu", dtype=torch.float32, adapters=adapters)


def greedy(prompt, adapter=None) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=prompt, max_new_tokens=NEW_TOKENS, temperature=0, adapter=adapter)


def assert_same(result, tokens, logprobs, tolerance=1e-4):
    assert result.token_ids == tokens
    assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs)) < tolerance


def test_adapter_matches_peft_unmerged_and_merged(gqa_model, tmp_path):
    folder, hf = gqa_model
    peft_model = make_adapter(hf, tmp_path / "npc", seed=1)
    e = engine(folder, npc=tmp_path / "npc")
    results = e.generate([greedy(p, "npc") for p in PROMPTS])
    base = e.generate([greedy(p) for p in PROMPTS])
    unmerged = [hf_greedy(peft_model, p, NEW_TOKENS) for p in PROMPTS]  # before the merge changes the model
    merged = peft_model.merge_and_unload()
    for prompt, result, plain, reference in zip(PROMPTS, results, base, unmerged):
        assert_same(result, *reference)  # the same sums as the engine's: its base product plus B(Ax)
        # Merged, HF's own logprobs move by up to ~7e-5 on this model (W + BA rounded in float32).
        assert_same(result, *hf_greedy(merged, prompt, NEW_TOKENS), tolerance=2e-4)
        assert plain.token_ids != result.token_ids  # the adapter changes what the model says
    assert_same(base[0], *hf_greedy(hf, PROMPTS[0], NEW_TOKENS))
    assert e.stats()["kv_blocks_in_use"] == 0


def test_two_adapters_and_none_share_a_batch(gqa_model, tmp_path):
    """Every row of a mixed batch gives the tokens of its own single run, and the logprobs of HF + peft
    with its own adapter (batching changes the order of float sums, so the oracle is the reference)."""
    folder, hf = gqa_model
    models = {"a": make_adapter(hf, tmp_path / "a", seed=2),
              "b": make_adapter(hf, tmp_path / "b", seed=3, targets=["q_proj", "v_proj", "down_proj"], r=8, alpha=4),
              None: hf}  # fmt: skip
    e = engine(folder, a=tmp_path / "a", b=tmp_path / "b")
    requests = [greedy(p, name) for p in PROMPTS[:2] for name in ("a", "b", None)]
    alone = [e.generate([r])[0] for r in requests]
    together = e.generate(requests)
    for request, single, mixed in zip(requests, alone, together):
        tokens, logprobs = hf_greedy(models[request.adapter], request.prompt_token_ids, NEW_TOKENS)
        assert single.token_ids == mixed.token_ids
        assert_same(mixed, tokens, logprobs)
    assert len({tuple(r.token_ids) for r in alone[:3]}) == 3  # three different models


def test_decodes_of_many_adapters_in_one_step(gqa_model, tmp_path):
    """Eight requests, four adapters, staggered: decode steps mix adapters row by row (the stacked product)
    and prompt chunks of 16+ rows run as their own groups."""
    folder, hf = gqa_model
    names = [f"n{i}" for i in range(4)]
    for i, name in enumerate(names):
        make_adapter(hf, tmp_path / name, seed=10 + i, r=2 + i)
    e = engine(folder, **{n: tmp_path / n for n in names})
    prompts = [torch.randint(0, 256, (7 + 5 * i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    requests = [greedy(p, names[i % 4] if i != 5 else None) for i, p in enumerate(prompts)]
    alone = [e.generate([r])[0] for r in requests]
    ids, results = [], {}
    for step in range(1000):
        if step % 2 == 0 and len(ids) < len(requests):
            ids.append(e.add_request(requests[len(ids)]))
        results.update((r.request_id, r) for r in e.step().finished)
        if len(results) == len(requests):
            break
    for single, request_id in zip(alone, ids):
        assert_same(results[request_id], single.token_ids, single.logprobs)


def test_score_under_an_adapter(gqa_model, tmp_path):
    folder, hf = gqa_model
    peft_model = make_adapter(hf, tmp_path / "chess", seed=4)
    e = engine(folder, chess=tmp_path / "chess")
    prompt, candidates = PROMPTS[1], [[3, 4, 5], [9], [200, 1]]
    scored = e.score(ScoreRequest(prompt_token_ids=prompt, candidates=candidates, adapter="chess"))
    plain = e.score(ScoreRequest(prompt_token_ids=prompt, candidates=candidates))
    for cand, got, base in zip(candidates, scored.candidates, plain.candidates):
        with torch.no_grad():
            logits = peft_model(torch.tensor([prompt + cand])).logits[0].float()
        want = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(1, torch.tensor(cand)[:, None]).sum().item()
        assert abs(got.logprob - want) < 1e-4
        assert abs(base.logprob - got.logprob) > 1e-3


def test_prefix_cache_never_crosses_adapters(gqa_model, tmp_path):
    folder, hf = gqa_model
    make_adapter(hf, tmp_path / "a", seed=6)
    make_adapter(hf, tmp_path / "b", seed=7)
    prompt = PROMPTS[2]  # 40 tokens: 4 full blocks of 8 can come from the cache (the last token must run)
    fresh = {name: engine(folder, a=tmp_path / "a", b=tmp_path / "b").generate([greedy(prompt, name)])[0]
             for name in ("a", "b", None)}  # fmt: skip
    e = engine(folder, a=tmp_path / "a", b=tmp_path / "b")
    runs = [(name, e.generate([greedy(prompt, name)])[0]) for name in ("a", "b", None, "a", "b", None)]
    assert [r.num_cached_tokens for _, r in runs] == [0, 0, 0, 32, 32, 32]
    for name, result in runs:
        assert result.token_ids == fresh[name].token_ids  # each its own result, from the cache or not
    assert e.stats()["cached_prompt_tokens"] == 96
    # an adapter loaded again under the same name is another adapter: nothing cached before is reused
    e.unload_adapter("a")
    e.load_adapter("a", tmp_path / "b")
    again = e.generate([greedy(prompt, "a")])[0]
    assert again.num_cached_tokens == 0 and again.token_ids == fresh["b"].token_ids


def test_snapshot_under_an_adapter_records_it_and_restores_only_with_it(gqa_model, tmp_path):
    """A saved conversation of an NPC with its own adapter: restored where the same adapter is loaded, its
    blocks serve that adapter's requests only; elsewhere (adapter missing, or another file under the name)
    the restore is refused and changes nothing."""
    folder, hf = gqa_model
    make_adapter(hf, tmp_path / "a", seed=8)
    make_adapter(hf, tmp_path / "b", seed=9)
    chat = PROMPTS[2]  # 40 tokens: the state holds 5 blocks of 8
    state = engine(folder, a=tmp_path / "a").snapshot(prompt_token_ids=chat, adapter="a")
    follow_up = chat + [7, 8, 9]
    computed = {name: engine(folder, a=tmp_path / "a").generate([greedy(follow_up, name)])[0]
                for name in ("a", None)}  # fmt: skip

    e = engine(folder, a=tmp_path / "a", b=tmp_path / "b")
    assert e.restore(state) == 40
    runs = {name: e.generate([greedy(follow_up, name)])[0] for name in ("b", None, "a")}
    assert [runs[n].num_cached_tokens for n in ("b", None, "a")] == [0, 0, 40]
    assert runs["a"].token_ids == computed["a"].token_ids
    assert runs[None].token_ids == computed[None].token_ids

    for loaded, message in [({}, "'a', which is not loaded"), ({"a": tmp_path / "b"}, "another LoRA adapter")]:
        other = engine(folder, **loaded)
        with pytest.raises(ValueError, match=message):
            other.restore(state)
        assert other.stats()["kv_blocks_cached"] == 0
    base_state = engine(folder, a=tmp_path / "a").snapshot(prompt_token_ids=chat)
    e = engine(folder, a=tmp_path / "a")
    assert e.restore(base_state) == 40
    assert e.generate([greedy(follow_up, "a")])[0].num_cached_tokens == 0  # the base model's K/V is not a's


def test_deterministic_requests_refuse_an_adapter(gqa_model, tmp_path):
    folder, hf = gqa_model
    make_adapter(hf, tmp_path / "a", seed=8)
    e = engine(folder, a=tmp_path / "a")
    with pytest.raises(ValueError, match="deterministic requests run without a LoRA adapter"):
        e.add_request(GenerationRequest(prompt_token_ids=[1, 2, 3], adapter="a", deterministic=True, seed=1))
    assert e.stats()["waiting"] == 0
