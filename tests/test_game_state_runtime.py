"""Game state through ``gllm serve``: saved states across runtime restarts, pins, events mid-line, long chats.

Real server processes (float32, so greedy tokens are exact against an in-process engine) spoken to with
the Python client, and with raw DEALER sockets where the wire itself is checked.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from gllm.client import Client, ServerError
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.runtime.protocol import encode
from runtime_fixtures import build_tiny_llama, dealer, recv, request, start_server, stats, wait_until

BLOCK = 16  # the runtime's block size


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-state"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Another model of the same shape: its states are not ours."""
    folder = tmp_path_factory.mktemp("tiny-other")
    build_tiny_llama(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tiny_dir, tmp_path_factory.mktemp("state-log"), "--dtype", "float32", "--kv-blocks", "64",
                       "--max-batch-size", "4", "--max-pinned-memory", str(20 * bytes_per_block()))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def bytes_per_block() -> int:
    return 2 * 2 * BLOCK * 2 * 16 * 4  # keys and values, 2 layers, 2 KV heads of 16 floats


def greedy(client: Client, prompt: list[int], n: int = 10):
    return client.complete(prompt_token_ids=prompt, max_tokens=n, temperature=0, ignore_eos=True)


def test_snapshot_survives_a_restart_of_the_runtime(tiny_dir, tmp_path):
    chat = ids(70, seed=1)  # four whole blocks
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = start_server(tiny_dir, tmp_path / "a", "--dtype", "float32")
    with Client(first.endpoint) as client:
        saved = client.snapshot(prompt_token_ids=chat)
    assert first.stop() == 0
    assert saved.tokens == 64 and isinstance(saved.state, bytes)

    second = start_server(tiny_dir, tmp_path / "b", "--dtype", "float32")
    try:
        with Client(second.endpoint) as client:
            restored = client.restore(saved.state)
            follow_up = chat + ids(9, seed=2)
            result = greedy(client, follow_up)
    finally:
        assert second.stop() == 0
    assert restored.tokens == 64 and not restored.pinned
    assert result.usage.cached_tokens == 64
    engine = LLMEngine(tiny_dir, GeneratorParams(max_seq_len=512), dtype=torch.float32)
    computed = engine.generate([GenerationRequest(prompt_token_ids=follow_up, max_new_tokens=10, temperature=0,
                                                  ignore_eos=True)])[0]
    assert result.token_ids == computed.token_ids and computed.num_cached_tokens == 0


def test_foreign_damaged_and_oversized_states_are_refused(server, other_dir, tmp_path):
    other = start_server(other_dir, tmp_path, "--dtype", "float32")
    try:
        with Client(other.endpoint) as client:
            foreign = client.snapshot(prompt_token_ids=ids(40, seed=3)).state
    finally:
        assert other.stop() == 0
    sock = dealer(server.endpoint)
    with Client(server.endpoint) as client:
        good = client.snapshot(prompt_token_ids=ids(40, seed=3)).state
        before = stats(sock)
        for state, words in [(foreign, "another model"), (good[: len(good) // 2], "truncated"),
                             (bytes(range(256)) * 8, "not a gLLM KV state"), (b"", "not a gLLM KV state")]:
            with pytest.raises(ServerError, match=words) as err:
                client.restore(state)
            assert err.value.code == "bad_request"
        after = stats(sock)
    for key in ("kv_blocks_cached", "kv_blocks_in_use", "kv_blocks_pinned", "cache_evictions"):
        assert after[key] == before[key], key
    reply = request(sock, {"type": "restore", "id": 1, "state": "not bytes"})
    assert reply["type"] == "error" and reply["code"] == "bad_request" and "bin" in reply["message"]
    sock.close(linger=0)


def test_state_size_limit(tiny_dir, tmp_path):
    srv = start_server(tiny_dir, tmp_path, "--dtype", "float32", "--max-state-size", str(3 * bytes_per_block()),
                       "--max-message-size", "2048")
    try:
        with Client(srv.endpoint) as client:
            with pytest.raises(ServerError, match="max_state_bytes") as err:
                client.snapshot(prompt_token_ids=ids(70, seed=4))  # four blocks
            assert err.value.code == "too_long"
            small = client.snapshot(prompt_token_ids=ids(40, seed=4))  # two blocks, larger than a message
            assert len(small.state) > 2048 and client.restore(small.state).tokens == 32
            with pytest.raises(ServerError, match="max_state_bytes") as err:
                client.restore(small.state + bytes(3 * bytes_per_block() - len(small.state) + 100))
            assert err.value.code == "too_long"
            assert client.info().limits["max_state_bytes"] == 3 * bytes_per_block()
        sock = dealer(srv.endpoint)  # other messages keep the message limit (and are not read beyond it)
        big = request(sock, {"type": "generate", "id": 1, "prompt_token_ids": [255] * 1500})  # 3,000 bytes
        assert big["code"] == "too_long" and "max_message_bytes" in big["message"] and big["id"] is None
        sock.close(linger=0)
    finally:
        assert srv.stop() == 0


def pressure(client: Client, seed: int) -> None:
    """Unrelated prompts that need every block that is not held, evicting the cached ones."""
    streams = [client.generate(prompt_token_ids=ids(240, seed=seed + i), max_tokens=8, ignore_eos=True)
               for i in range(4)]
    for stream in streams:
        stream.wait()


def test_pins_survive_pressure_and_go_on_release_and_on_disconnect(server):
    chat = ids(100, seed=5)  # six whole blocks
    watcher, owner = dealer(server.endpoint), dealer(server.endpoint)
    with Client(server.endpoint) as other:
        state = other.snapshot(prompt_token_ids=chat).state
        big = other.snapshot(prompt_token_ids=ids(250, seed=6)).state
        hero = request(owner, {"type": "restore", "id": "hero", "state": state, "pin": True})
        assert hero == {"type": "restored", "id": "hero", "tokens": 96, "pinned": True}
        again = request(owner, {"type": "restore", "id": "hero", "state": state, "pin": True})
        assert again["code"] == "bad_request" and "already pins" in again["message"]
        s = stats(watcher)
        assert s["kv_blocks_pinned"] == 6 and s["pinned_states"] == 1 and s["max_pinned_blocks"] == 20
        over = request(owner, {"type": "restore", "id": "villain", "state": big, "pin": True})
        assert over["code"] == "overloaded" and "limit is 20 blocks" in over["message"]
        pressure(other, 100)
        assert stats(watcher)["cache_evictions"] > 0
        assert greedy(other, chat + [7, 7], 2).usage.cached_tokens == 96
        owner.send(encode({"type": "release", "id": "hero"}))
        wait_until(lambda: stats(watcher)["kv_blocks_pinned"] == 0, 60)
        pressure(other, 200)
        assert greedy(other, chat + [7, 7], 2).usage.cached_tokens < 96
        assert request(owner, {"type": "restore", "id": "hero", "state": state, "pin": True})["pinned"]
        assert stats(watcher)["pinned_states"] == 1
    owner.close(linger=0)  # a client that disconnects keeps nothing pinned
    wait_until(lambda: stats(watcher)["pinned_states"] == 0 and stats(watcher)["kv_blocks_pinned"] == 0, 60)
    watcher.close(linger=0)


def test_injection_over_the_wire_continues_like_a_fresh_prompt(server, tiny_dir):
    prompt, event = ids(20, seed=7), ids(5, seed=8)
    with Client(server.endpoint) as client:
        stream = client.generate(prompt_token_ids=prompt, max_tokens=400, temperature=0, ignore_eos=True)
        before = [next(stream) for _ in range(3)]
        client.inject(stream.id, token_ids=event)
        client.inject(12345, token_ids=event)  # unknown: ignored
        done = stream.wait()
    marked = [t for t in done.tokens if t.injected]
    assert len(marked) == 1 and marked[0].injected == 5 and marked[0].index >= 3
    k = marked[0].index
    assert done.usage.injected_tokens == 5 and len(done.tokens) == 400
    engine = LLMEngine(tiny_dir, GeneratorParams(max_seq_len=1024), dtype=torch.float32)
    fresh = engine.generate([GenerationRequest(prompt_token_ids=prompt + done.token_ids[:k] + event,
                                               max_new_tokens=20, temperature=0, ignore_eos=True)])[0]
    assert done.token_ids[k : k + 20] == fresh.token_ids
    assert [t.token_id for t in before] == done.token_ids[:3]


def next_non_token(sock) -> dict:
    while (msg := recv(sock))["type"] == "token":
        pass
    return msg


def test_bad_injections_get_a_nil_id_error_and_the_stream_goes_on(server):
    sock = dealer(server.endpoint)
    sock.send(encode({"type": "generate", "id": "npc", "prompt_token_ids": [1, 2, 3], "max_tokens": 50,
                      "ignore_eos": True}))
    sock.send(encode({"type": "inject", "id": "npc", "token_ids": [999999]}))
    error = next_non_token(sock)
    assert error["type"] == "error" and error["id"] is None and "outside the vocabulary" in error["message"]
    sock.send(encode({"type": "inject", "id": "npc", "text": "x", "token_ids": [1]}))
    error = next_non_token(sock)
    assert error["type"] == "error" and error["id"] is None and "exactly one" in error["message"]
    done = next_non_token(sock)
    assert done["type"] == "done" and done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 50
    sock.close(linger=0)
