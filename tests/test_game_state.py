"""Game state in the engine: saved and restored conversations, pins, long chats, events mid-line, pacing.

Tiny random Llama models (float32, so greedy tokens are exact against a run that computed everything).
Exact replay has its own module (``test_replay.py``); the runtime and clients are in ``test_game_state_runtime.py``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, build_tiny_llama
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, StateError
from gllm.engine.game_state import fit_chat

BS = 8


def engine(folder, **params) -> LLMEngine:
    params = {"block_size": BS, "max_batch_size": 8, "max_seq_len": 256, **params}
    return LLMEngine(folder, GeneratorParams(**params), dtype=torch.float32)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(ids: list[int], n: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=ids, max_new_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same shape as ``gqa_model``, other weights: its states must not restore there."""
    folder = tmp_path_factory.mktemp("other")
    build_tiny_llama(folder, seed=1, **TINY_CONFIGS["gqa_tied_llama3"])
    return folder


def test_snapshot_restore_in_a_new_engine_serves_the_prefix(gqa_model):
    folder, _ = gqa_model
    chat = tokens(45, seed=1)  # 5 full blocks of 8, and 5 tokens more
    state = engine(folder).snapshot(prompt_token_ids=chat)
    assert isinstance(state, bytes)

    fresh = engine(folder)
    assert fresh.restore(state) == 40
    assert fresh.stats()["kv_blocks_cached"] == 5 and fresh.stats()["kv_blocks_in_use"] == 0
    follow_up = chat + tokens(7, seed=2)
    restored = fresh.generate([greedy(follow_up)])[0]
    computed = engine(folder).generate([greedy(follow_up)])[0]
    assert restored.num_cached_tokens == 40
    assert computed.num_cached_tokens == 0
    assert restored.token_ids == computed.token_ids


def test_snapshot_takes_cached_blocks_and_short_prompts_are_refused(gqa_model):
    folder, _ = gqa_model
    eng = engine(folder)
    chat = tokens(33, seed=3)
    eng.generate([greedy(chat, 2)])
    before = eng.stats()["computed_tokens"]
    state = eng.snapshot(prompt_token_ids=chat)
    assert eng.stats()["computed_tokens"] - before == BS  # the last block only: a hit stops one token short
    assert engine(folder).restore(state) == 32
    with pytest.raises(ValueError, match="less than one KV block"):
        eng.snapshot(prompt_token_ids=tokens(BS - 1, seed=4))


def test_bad_states_are_refused_and_change_nothing(gqa_model, other_model):
    folder, _ = gqa_model
    state = engine(folder).snapshot(prompt_token_ids=tokens(40, seed=5))
    target = engine(folder)
    target.generate([greedy(tokens(30, seed=6), 2)])
    before = target.stats()
    with pytest.raises(StateError, match="another model"):
        engine(other_model).restore(state)
    with pytest.raises(StateError, match="another model"):
        engine(folder, block_size=16).restore(state)
    damaged = bytearray(state)
    damaged[-3] ^= 0x55  # a bit flip inside the K/V data
    bad = {"truncated": state[: len(state) - 100], "random": bytes(torch.randint(0, 256, (5000,)).tolist()),
           "empty": b"", "damaged": bytes(damaged)}
    for name, blob in bad.items():
        with pytest.raises(StateError):
            target.restore(blob)
    with pytest.raises(StateError, match="checksum"):
        target.restore(bad["damaged"])
    after = target.stats()
    for key in ("kv_blocks_cached", "kv_blocks_in_use", "kv_blocks_pinned", "cache_evictions"):
        assert after[key] == before[key], key


def pressure(eng: LLMEngine, seed: int) -> None:
    """Fill the cache with unrelated prompts, evicting whatever cached blocks nobody holds."""
    eng.generate([greedy(tokens(60, seed=seed + i), 4) for i in range(6)])


def test_pinned_blocks_survive_pressure_until_released(gqa_model):
    folder, _ = gqa_model
    chat = tokens(41, seed=7)
    state = engine(folder).snapshot(prompt_token_ids=chat)
    eng = engine(folder, num_kv_blocks=24, max_batch_size=3)
    eng.add_restore(state, pin="hero")
    eng.step()
    assert eng.stats()["kv_blocks_pinned"] == 5 and eng.stats()["pinned_states"] == 1
    pressure(eng, 100)
    assert eng.stats()["cache_evictions"] > 0
    assert eng.generate([greedy(chat + [1, 2, 3], 2)])[0].num_cached_tokens == 40
    eng.release("hero")
    eng.release("nobody")  # unknown names are ignored
    eng.step()
    assert eng.stats()["kv_blocks_pinned"] == 0 and eng.stats()["kv_blocks_in_use"] == 0
    pressure(eng, 200)
    assert eng.generate([greedy(chat + [1, 2, 3], 2)])[0].num_cached_tokens < 40


def test_pins_are_bounded(gqa_model):
    folder, _ = gqa_model
    state = engine(folder).snapshot(prompt_token_ids=tokens(40, seed=8))
    eng = engine(folder, max_pinned_blocks=4)
    with pytest.raises(ValueError, match="limit is 4 blocks"):
        eng.restore(state, pin="big")
    assert eng.stats()["kv_blocks_pinned"] == 0 and eng.stats()["kv_blocks_in_use"] == 0
    assert eng.restore(state) == 40  # unpinned, it fits the cache


# ------------------------------------------------------------------------------------------ long chats
def test_fit_chat_drops_the_oldest_turns_after_the_system_messages():
    def encode(messages):  # ten tokens a message
        return [len(m["content"]) for m in messages for _ in range(10)]

    chat = [{"role": "system", "content": "s"}] + [{"role": ("user", "assistant")[i % 2], "content": "x" * (i + 2)}
                                                     for i in range(50)]
    ids, dropped = fit_chat(encode, chat, 105)
    assert dropped == 41 and len(ids) == 100
    assert ids[:10] == [1] * 10 and ids[-10:] == [51] * 10  # the system prompt and the last turn stay
    assert fit_chat(encode, chat[:5], 100) == (encode(chat[:5]), 0)
    with pytest.raises(ValueError, match="does not fit"):
        fit_chat(encode, chat, 15)


def test_default_model_chat_of_50_turns_drops_the_oldest_to_fit():
    eng = LLMEngine("smollm2-135m-instruct", GeneratorParams(max_seq_len=512, max_batch_size=1), dtype=torch.float32)
    system = {"role": "system", "content": "You are Mira, the blacksmith of Oakvale."}
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"Turn {i}: the weather over the hills is changing."}
             for i in range(50)]
    chat = [system, *turns]
    assert len(eng.tokenizer.apply_chat_template(chat)) > 512
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request(GenerationRequest(messages=chat, max_new_tokens=16))
    req = GenerationRequest(messages=chat, max_new_tokens=16, temperature=0, context_overflow="drop_oldest")
    result = eng.generate([req])[0]
    kept = eng.tokenizer.decode(result.prompt_token_ids)
    assert 0 < result.num_dropped_turns < 50
    assert len(result.prompt_token_ids) + 16 <= 512
    assert kept.startswith("system\n" + system["content"]) or system["content"] in kept.split("Turn")[0]
    assert "Turn 49:" in kept and f"Turn {result.num_dropped_turns - 1}:" not in kept
    assert f"Turn {result.num_dropped_turns}:" in kept
    # one more turn dropped would not have been needed: the fewest are dropped
    fewer = [system, *turns[result.num_dropped_turns - 1 :]]
    assert len(eng.tokenizer.apply_chat_template(fewer)) + 16 > 512


# --------------------------------------------------------------------------------------- events mid-line
def test_injected_tokens_continue_like_a_fresh_prompt(gqa_model):
    folder, _ = gqa_model
    eng = engine(folder)
    prompt, event = tokens(21, seed=9), tokens(6, seed=10)
    request_id = eng.add_request(greedy(prompt, 20))
    deltas = []
    while len(deltas) < 5:
        deltas += eng.step().deltas
    eng.inject(request_id, token_ids=event)
    eng.inject("no-such-request", token_ids=event)  # unknown ids are ignored
    result = None
    while result is None:
        out = eng.step()
        deltas += out.deltas
        result = next(iter(out.finished), None)
    marked = [d.index for d in deltas if d.injected]
    assert marked == [5] and deltas[5].injected == len(event)
    assert len(result.token_ids) == 20 and result.num_injected_tokens == len(event)
    before, after = result.token_ids[:5], result.token_ids[5:]
    fresh = engine(folder).generate([greedy(prompt + before + event, 15)])[0]
    assert fresh.token_ids == after
    eng.inject(request_id, token_ids=event)  # finished: ignored
    assert not eng.step().deltas and eng.stats()["kv_blocks_in_use"] == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.inject(request_id, token_ids=[256])


def test_injection_that_fills_the_context_ends_the_request_with_length(gqa_model):
    folder, _ = gqa_model
    eng = engine(folder, max_seq_len=40)
    request_id = eng.add_request(greedy(tokens(20, seed=11), 15))
    while not eng.step().deltas:
        pass
    eng.inject(request_id, token_ids=tokens(25, seed=12))
    result = eng._run([request_id])[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 1
    assert eng.stats()["kv_blocks_in_use"] == 0


# -------------------------------------------------------------------------------------- pacing, deadlines
class FakeClock:
    """The scheduler's clock, advanced by the test: pacing is checked without depending on real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_paced_request_waits_for_its_tokens_and_leaves_steps_to_the_others(gqa_model):
    folder, _ = gqa_model
    eng = engine(folder, max_batch_size=16)
    eng.scheduler.clock = clock = FakeClock()
    paced = eng.add_request(GenerationRequest(prompt_token_ids=tokens(9, seed=13), max_new_tokens=5,
                                              temperature=0, ignore_eos=True, max_tokens_per_second=5))
    others = [eng.add_request(greedy(tokens(9, seed=20 + i), 40)) for i in range(15)]
    times: dict[str, list[float]] = {}
    rows = []
    while eng.has_work():
        computed = eng.stats().get("computed_tokens", 0)
        for d in eng.step().deltas:
            times.setdefault(d.request_id, []).append(clock.now)
        rows.append(eng.stats()["computed_tokens"] - computed)
        clock.now += 0.01  # a step takes 10 ms of the fake clock
    gaps = [b - a for a, b in zip(times[paced], times[paced][1:])]
    assert len(times[paced]) == 5 and min(gaps) >= 0.2 - 1e-9  # at most 5 tokens a second
    assert all(len(times[r]) == 40 for r in others)
    assert rows.count(15) >= 30  # the paced request sat out most decode steps
    assert eng.stats()["kv_blocks_in_use"] == 0


def test_wait_time_tells_how_long_a_paced_request_sleeps(gqa_model):
    folder, _ = gqa_model
    eng = engine(folder)
    eng.scheduler.clock = clock = FakeClock()
    eng.add_request(GenerationRequest(prompt_token_ids=tokens(9, seed=14), max_new_tokens=3, temperature=0,
                                      ignore_eos=True, max_tokens_per_second=2))
    assert eng.wait_time() == 0
    assert len(eng.step().deltas) == 1  # the first token is not paced
    assert eng.wait_time() == pytest.approx(0.5)
    assert eng.step().deltas == [] and eng.has_work()
    clock.now = 0.5
    assert eng.wait_time() == 0 and len(eng.step().deltas) == 1


def test_earlier_deadline_first_within_a_priority(gqa_model):
    folder, _ = gqa_model
    eng = engine(folder, max_batch_size=1)
    ids = {name: eng.add_request(GenerationRequest(prompt_token_ids=tokens(9, seed=15), max_new_tokens=2,
                                                   temperature=0, **kw))
           for name, kw in [("none", {}), ("late", {"deadline_ms": 5000}), ("soon", {"deadline_ms": 100}),
                            ("urgent", {"priority": 1})]}
    order = []
    while eng.has_work():
        order += [r.request_id for r in eng.step().finished]
    assert order == [ids[n] for n in ("urgent", "soon", "late", "none")]
