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
