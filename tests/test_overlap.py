"""Overlapped decoding (``LLMEngine(overlap=True)``): the next decode step is queued before the host reads
this step's tokens. On a GPU that hides the host's work; here on the CPU it checks the bookkeeping: the
same tokens, logprobs and finish reasons as without overlap, through stops, aborts, arrivals and
preemption, and no block leaked."""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

DEVICE = os.environ.get("GLLM_TEST_DEVICE", "cpu")


def prompts(n: int, seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 50, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]


def engines(folder, **params) -> tuple[LLMEngine, LLMEngine]:
    p = GeneratorParams(**{"block_size": 4, "max_batch_size": 8, "max_seq_len": 128, **params})
    make = lambda overlap: LLMEngine(folder, p, device=DEVICE, dtype=torch.float32, overlap=overlap)  # noqa: E731
    return make(False), make(True)


def summary(results) -> list[tuple]:
    """What must match exactly; logprobs are compared apart (a batch of another shape may move the last
    float32 bit: a step queued ahead still holds the sequences that stopped before it)."""
    return [(r.token_ids, r.ranks, [[t for t, _ in top] for top in r.top_logprobs], r.finish_reason) for r in results]


def assert_same(got, expected) -> None:
    assert summary(got) == summary(expected)
    for a, b in zip(got, expected):
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) < 1e-4


def test_same_results_with_stops_seeds_and_forks(gqa_model):
    folder, _ = gqa_model
    plain, ahead = engines(folder)
    ps = prompts(6)
    first = plain.generate([GenerationRequest(prompt_token_ids=ps[0], max_new_tokens=20, temperature=0)])[0]
    stop_token = first.token_ids[6]  # this request stops on an id it will sample mid-way

    def requests():
        return [
            GenerationRequest(prompt_token_ids=ps[0], max_new_tokens=20, temperature=0, stop_token_ids=[stop_token]),
            GenerationRequest(prompt_token_ids=ps[1], max_new_tokens=3, temperature=0),
            GenerationRequest(prompt_token_ids=ps[2], max_new_tokens=25, temperature=0.9, top_k=20, seed=7, logprobs=2),
            GenerationRequest(prompt_token_ids=ps[3], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, n=2),
            GenerationRequest(prompt_token_ids=ps[4], max_new_tokens=1, temperature=0),
            GenerationRequest(prompt_token_ids=ps[5], max_new_tokens=30, temperature=0, logprobs=1),
        ]

    expected = plain.generate(requests())
    got = ahead.generate(requests())
    assert_same(got, expected)
    for a, b in zip(got, expected):
        assert_same(a.forks, b.forks)
    assert got[0].finish_reason == "stop" and got[0].token_ids[-1] == stop_token
    assert ahead.stats()["steps_ahead"] > 10 and plain.stats().get("steps_ahead", 0) == 0
    while ahead.has_work():  # a step queued ahead for a finished sequence is drained without output
        assert not ahead.step().deltas
    assert ahead.stats()["kv_blocks_in_use"] == 0


def drive(engine: LLMEngine, ps: list[list[int]]) -> dict[str, tuple]:
    """Arrivals between steps and an abort mid-way; returns each request's tokens and finish reason."""
    ids = [engine.add_request(GenerationRequest(prompt_token_ids=p, max_new_tokens=30, temperature=0)) for p in ps[:3]]
    results, streamed = {}, {}
    for step in range(200):
        if step == 8:
            ids += [engine.add_request(GenerationRequest(prompt_token_ids=p, max_new_tokens=20, temperature=0)) for p in ps[3:]]
        if step == 12:
            engine.abort(ids[1])
        out = engine.step()
        for d in out.deltas:
            streamed.setdefault(d.request_id, []).append(d.token_id)
        for r in out.finished:
            results[r.request_id] = (r.token_ids, r.finish_reason)
        if not engine.has_work():
            break
    assert all(streamed.get(i, []) == results[i][0] for i in ids)  # the stream and the result agree
    return results


def test_arrivals_and_aborts(gqa_model):
    folder, _ = gqa_model
    plain, ahead = engines(folder)
    ps = prompts(5, seed=8)
    expected, got = drive(plain, ps), drive(ahead, ps)
    assert got.keys() == expected.keys()
    for rid in expected:
        tokens, reason = got[rid]
        if expected[rid][1] == "aborted":
            assert reason == "aborted" and tokens == expected[rid][0][: len(tokens)]
        else:
            assert (tokens, reason) == expected[rid]
    assert ahead.stats()["steps_ahead"] > 0 and ahead.stats()["kv_blocks_in_use"] == 0


def test_preemption_with_a_small_pool(gqa_model):
    folder, _ = gqa_model
    ps = prompts(6, seed=2)
    reqs = lambda: [GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0) for p in ps]  # noqa: E731
    big, _ = engines(folder)
    _, small = engines(folder, num_kv_blocks=40)
    expected = [r.token_ids for r in big.generate(reqs())]
    assert [r.token_ids for r in small.generate(reqs())] == expected
    assert small.stats()["preemptions"] > 0 and small.stats()["steps_ahead"] > 0
    while small.has_work():
        small.step()
    assert small.stats()["kv_blocks_in_use"] == 0


_alone: dict[tuple, list[int]] = {}


@settings(max_examples=30, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 14), st.integers(0, 6)), min_size=1, max_size=8),
    aborts=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40)), max_size=3),
    num_blocks=st.integers(16, 36),  # 16 blocks hold the longest request (47 + 14 tokens)
)
def test_random_traffic_keeps_tokens_and_blocks(gqa_model, arrivals, aborts, num_blocks):
    """Random arrival steps, lengths, aborts and pool sizes (preemption included) with overlap on: every
    request that is not aborted gets the tokens it gets alone, an aborted one a prefix of them, the
    stream matches the results, and every block comes back."""
    folder, _ = gqa_model
    ps = prompts(6, seed=11)
    if "plain" not in _alone:
        _alone["plain"] = LLMEngine(folder, GeneratorParams(block_size=4, max_batch_size=8, max_seq_len=128),
                                    device=DEVICE, dtype=torch.float32, overlap=False)  # fmt: skip
    engine = LLMEngine(folder, GeneratorParams(block_size=4, max_batch_size=4, max_seq_len=128, num_kv_blocks=num_blocks),
                       device=DEVICE, dtype=torch.float32, overlap=True)  # fmt: skip
    reqs = [(at, GenerationRequest(prompt_token_ids=ps[p], max_new_tokens=n, temperature=0)) for p, n, at in arrivals]
    ids, streamed, results = {}, {}, {}
    for step in range(400):
        for i, (at, req) in enumerate(reqs):
            if at == step:
                ids[i] = engine.add_request(req)
        for i, when in aborts:
            if when == step and i in ids:
                engine.abort(ids[i])
        out = engine.step()
        for d in out.deltas:
            streamed.setdefault(d.request_id, []).append(d.token_id)
        results.update({r.request_id: r for r in out.finished})
        if step > 6 and not engine.has_work():
            break
    assert len(results) == len(reqs) and engine.stats()["kv_blocks_in_use"] == 0
    for i, (_, req) in enumerate(reqs):
        key = (tuple(req.prompt_token_ids), req.max_new_tokens)
        if key not in _alone:
            _alone[key] = _alone["plain"].generate([req])[0].token_ids
        r = results[ids[i]]
        assert streamed.get(ids[i], []) == r.token_ids
        if r.finish_reason == "aborted":
            assert r.token_ids == _alone[key][: len(r.token_ids)]
        else:
            assert r.finish_reason == "length" and r.token_ids == _alone[key]


def test_score_requests_between_overlapped_decodes(gqa_model):
    """A score request arriving while decodes run ahead: same candidate logprobs as without overlap, and
    the decodes keep their tokens."""
    from gllm.engine.scoring import ScoreRequest

    folder, _ = gqa_model
    plain, ahead = engines(folder)
    ps = prompts(4, seed=13)
    score = ScoreRequest(prompt_token_ids=ps[3], candidates=[[5, 9], [17], [200, 3, 44]])
    outcomes = []
    for engine in (plain, ahead):
        ids = [engine.add_request(GenerationRequest(prompt_token_ids=p, max_new_tokens=20, temperature=0)) for p in ps[:3]]
        results = {}
        for step in range(300):
            if step == 6:
                ids.append(engine.add_score(score))
            results.update({r.request_id: r for r in engine.step().finished})
            if step > 6 and not engine.has_work():
                break
        outcomes.append([results[i] for i in ids])
    (*gen_plain, score_plain), (*gen_ahead, score_ahead) = outcomes
    assert [r.token_ids for r in gen_ahead] == [r.token_ids for r in gen_plain]
    for a, b in zip(score_ahead.candidates, score_plain.candidates):
        assert a.token_ids == b.token_ids and abs(a.logprob - b.logprob) < 1e-4
    assert ahead.stats()["steps_ahead"] > 0 and ahead.stats()["kv_blocks_in_use"] == 0
