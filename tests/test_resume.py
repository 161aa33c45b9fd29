"""A generation resumed after the tokens it already handed out (``GenerationRequest.resume``) goes on exactly
as the uninterrupted one: indexes, tokens, the seeded draws, text held back for a stop string, the end."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from test_tokenizer import build_sentencepiece_tokenizer

PROMPT = [5, 17, 99, 3, 42, 7, 180, 64, 12, 250, 33]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    folder = tmp_path_factory.mktemp("tiny-resume")
    build_tiny_llama(folder)
    return LLMEngine(folder, GeneratorParams(block_size=4, max_batch_size=4, max_seq_len=256), dtype=torch.float32)


def run(engine: LLMEngine, req: GenerationRequest):
    """Step one request to its end; returns its deltas and result."""
    request_id = engine.add_request(req)
    deltas, result = [], None
    while result is None:
        out = engine.step()
        deltas += [d for d in out.deltas if d.request_id == request_id]
        result = next((r for r in out.finished if r.request_id == request_id), None)
    return deltas, result


def streamed(result, k: int) -> list[tuple[int, float, int]]:
    return list(zip(result.token_ids[:k], result.logprobs[:k], result.ranks[:k]))


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=4.0, top_p=0.95, seed=1234)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("k", [1, 9])
def test_a_resumed_stream_goes_on_with_the_same_tokens(engine, sampling, k):
    req = lambda **kw: GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=24, ignore_eos=True,  # noqa: E731
                                         **sampling, **kw)
    _, full = run(engine, req())
    deltas, resumed = run(engine, req(resume=streamed(full, k)))
    assert [d.index for d in deltas] == list(range(k, 24))
    assert [d.token_id for d in deltas] == full.token_ids[k:]
    # The resumed tokens are recomputed as a prompt chunk, the uninterrupted ones were decodes: other
    # kernels, so the logprobs agree to rounding (large on this random model's wide logits).
    assert [d.logprob for d in deltas] == pytest.approx(full.logprobs[k:], abs=5e-3)
    assert resumed.token_ids == full.token_ids and resumed.finish_reason == "length"
    assert resumed.prompt_token_ids == PROMPT
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_without_the_skipped_draws_a_seeded_stream_would_differ(engine):
    """The check above can fail: resuming a seeded stream from a fresh generator gives other tokens."""
    sampled = dict(temperature=4.0, top_p=0.95, seed=1234)
    _, full = run(engine, GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=24, ignore_eos=True, **sampled))
    k = 9
    _, restarted = run(engine, GenerationRequest(prompt_token_ids=PROMPT + full.token_ids[:k], max_new_tokens=24 - k,
                                                 ignore_eos=True, **sampled))
    assert restarted.token_ids != full.token_ids[k:]


def test_a_stream_whose_end_was_lost_ends_at_once(engine):
    _, full = run(engine, GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=6, temperature=0))
    deltas, resumed = run(engine, GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=6, temperature=0,
                                                    resume=streamed(full, 6)))
    assert deltas == [] and resumed.finish_reason == "length" and resumed.token_ids == full.token_ids


def test_resume_needs_one_stream(engine):
    with pytest.raises(ValueError, match="n must be 1"):
        engine.add_request(GenerationRequest(prompt_token_ids=PROMPT, n=2, resume=[(1, -0.5, 1)]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(GenerationRequest(prompt_token_ids=PROMPT, resume=[(10**6, -0.5, 1)]))
    assert not engine.has_work()


def test_held_back_text_and_a_stop_string_carry_over(tmp_path):
    tokenizer = build_sentencepiece_tokenizer(tmp_path)
    build_tiny_llama(tmp_path, vocab_size=tokenizer.vocab_size, seed=3)
    engine = LLMEngine(tmp_path, GeneratorParams(block_size=4, max_seq_len=256), dtype=torch.float32)
    base = dict(prompt="the cat", max_new_tokens=40, temperature=0, ignore_eos=True)
    _, free = run(engine, GenerationRequest(**base))
    text = free.text
    # A stop string from the middle of the free text: the stopped stream holds its first characters back.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and text.find(stop) > 0
    first, stopped = run(engine, GenerationRequest(**base, stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.find(stop)]
    for k in range(1, len(stopped.token_ids)):
        rest, resumed = run(engine, GenerationRequest(**base, stop=[stop], resume=streamed(stopped, k)))
        client_text = "".join(d.text for d in first[:k]) + "".join(d.text for d in rest)
        assert client_text == stopped.text and resumed.text == stopped.text
        assert resumed.finish_reason == "stop" and resumed.token_ids == stopped.token_ids


def run_with_injection(engine: LLMEngine, req: GenerationRequest, after: int, ids: list[int]):
    """Step one request, injecting ``ids`` once ``after`` tokens have come out; its deltas and result."""
    request_id = engine.add_request(req)
    deltas, result, sent = [], None, False
    while result is None:
        out = engine.step()
        deltas += [d for d in out.deltas if d.request_id == request_id]
        if len(deltas) >= after and not sent:
            engine.inject(request_id, token_ids=ids)
            sent = True
        result = next((r for r in out.finished if r.request_id == request_id), None)
    return deltas, result


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=4.0, top_p=0.95, seed=77)],
                         ids=["greedy", "seeded"])
def test_a_resumed_stream_keeps_the_injections_in_their_places(engine, sampling):
    """A generation that was injected into and then resumed elsewhere (a replica failing over) goes on with
    the same tokens only when the injected ones are put back where they came in."""
    req = lambda **kw: GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=20, ignore_eos=True,  # noqa: E731
                                         **sampling, **kw)
    event = [11, 12, 13, 14, 15]
    deltas, full = run_with_injection(engine, req(), after=4, ids=event)
    [landed] = [d for d in deltas if d.injected]
    assert landed.injected == len(event) and landed.injected_ids == [event]
    assert full.num_injected_tokens == len(event) and len(full.token_ids) == 20
    where = landed.index
    for k in (where, where + 3):  # resumed right after the injection landed, and a few tokens later
        rest, resumed = run(engine, req(resume=streamed(full, k), resume_injected=[(where, event)]))
        assert [d.token_id for d in rest] == full.token_ids[k:]
        assert resumed.token_ids == full.token_ids and resumed.num_injected_tokens == len(event)
        assert resumed.prompt_token_ids == PROMPT
    # Without the injection the resumed stream sees another context: it goes elsewhere.
    rest, _ = run(engine, req(resume=streamed(full, where + 3)))
    assert [d.token_id for d in rest] != full.token_ids[where + 3 :]
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_resume_injected_must_fit_the_resumed_tokens(engine):
    with pytest.raises(ValueError, match="within 0..len"):
        engine.add_request(GenerationRequest(prompt_token_ids=PROMPT, resume=[(1, -0.5, 1)],
                                             resume_injected=[(2, [5])]))  # fmt: skip
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(GenerationRequest(prompt_token_ids=PROMPT, resume=[(1, -0.5, 1)],
                                             resume_injected=[(1, [10**6])]))  # fmt: skip
    assert not engine.has_work()
