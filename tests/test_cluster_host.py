"""What runs inside each replica, without Ray: the engine on its thread behind ``EngineService``, one reply
channel for every request, cancels, drops, a subscriber that leaves, and message types the service handles."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from gllm.cluster.host import ReplicaHost
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.runtime import protocol
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import encode
from runtime_fixtures import build_tiny_llama, wait_until

PEER = b"client-1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-host"))


def engine(folder) -> LLMEngine:
    return LLMEngine(folder, GeneratorParams(max_batch_size=4, max_seq_len=512), dtype=torch.float32)


@pytest.fixture(scope="module")
def host(tiny):
    host = ReplicaHost(engine(tiny), ServerLimits())
    yield host
    host.stop()
    assert not host.alive


def generate(request_id, **fields) -> bytes:
    return encode({"type": "generate", "id": request_id, "prompt_token_ids": [3, 1, 4, 1, 5], "temperature": 0,
                   "ignore_eos": True, **fields})


async def serve(host: ReplicaHost, requests: dict[bytes, tuple], cancel_after: dict[bytes, int] | None = None,
                leave_after: int | None = None, inject_after: dict[bytes, tuple[int, list[int]]] | None = None,
                ) -> dict[bytes, list[dict]]:  # fmt: skip
    """Subscribe, open ``requests`` (peer -> (frame, resume[, injected])), and collect each peer's replies
    until every request has ended; ``cancel_after``: send a cancel once a peer has that many replies;
    ``inject_after``: (that many replies, token ids) to inject then; ``leave_after``: leave the subscription
    after that many batches."""
    got: dict[bytes, list[dict]] = {peer: [] for peer in requests}
    channel = host.subscribe()
    pending = asyncio.ensure_future(channel.__anext__())
    for peer, (frame, *resume) in requests.items():
        host.open(peer, frame, *resume)
    batches = 0
    while any(not r or r[-1]["type"] not in protocol.FINAL_REPLIES for r in got.values()):
        batch = await pending
        batches += 1
        for peer, msg in batch:
            got[peer].append(msg)
            if cancel_after and len(got[peer]) == cancel_after.get(peer):
                assert await host.call(peer, encode({"type": "cancel", "id": msg["id"]})) == []
            if inject_after and len(got[peer]) == inject_after.get(peer, (None,))[0]:
                inject = {"type": "inject", "id": msg["id"], "token_ids": inject_after[peer][1]}
                assert await host.call(peer, encode(inject)) == []
        if leave_after is not None and batches >= leave_after:
            break
        pending = asyncio.ensure_future(channel.__anext__())
    await channel.aclose()
    return got


def test_the_channel_carries_each_request_s_replies_in_order(host, tiny):
    got = asyncio.run(serve(host, {b"a": (generate(1, max_tokens=30), None),
                                   b"b": (generate(1, max_tokens=12), None)}))  # same id, other request
    expected = engine(tiny).generate([GenerationRequest(prompt_token_ids=[3, 1, 4, 1, 5], max_new_tokens=30,
                                                        temperature=0, ignore_eos=True)])[0]
    first, second = got[b"a"], got[b"b"]
    assert [m["token_id"] for m in first[:-1]] == expected.token_ids
    assert [m["index"] for m in first[:-1]] == list(range(30)) and first[-1]["type"] == "done"
    assert len(second) == 13 and second[-1]["usage"]["completion_tokens"] == 12


def test_a_resumed_request_starts_after_the_tokens_given(host):
    whole = asyncio.run(serve(host, {b"w": (generate("w", max_tokens=20), None)}))[b"w"][:-1]
    given = [(m["token_id"], m["logprob"], m["rank"]) for m in whole[:8]]
    rest = asyncio.run(serve(host, {b"r": (generate("r", max_tokens=20), given)}))[b"r"]
    assert [m["index"] for m in rest[:-1]] == list(range(8, 20))
    assert [m["token_id"] for m in rest[:-1]] == [m["token_id"] for m in whole[8:]]
    assert rest[-1]["usage"]["completion_tokens"] == 20


def test_token_replies_carry_injected_ids_that_a_resumed_request_puts_back(host):
    """In a replica, a token after an injection names its ids, for the front end to carry to another replica
    on a failover; opened again with them in place, the request goes on with the same tokens."""
    event = [9, 8, 7, 6]
    whole = asyncio.run(serve(host, {b"i": (generate("i", max_tokens=16), None)}, inject_after={b"i": (3, event)}))
    tokens = whole[b"i"][:-1]
    [landed] = [m for m in tokens if "injected_ids" in m]
    assert landed["injected_ids"] == [event] and landed["injected"] == len(event)
    where = landed["index"]
    given = [(m["token_id"], m["logprob"], m["rank"]) for m in tokens[: where + 2]]
    rest = asyncio.run(serve(host, {b"j": (generate("j", max_tokens=16), given, [(where, event)])}))[b"j"]
    assert [m["token_id"] for m in rest[:-1]] == [m["token_id"] for m in tokens[where + 2 :]]
    assert rest[-1]["usage"]["injected_tokens"] == len(event)


def test_cancel_ends_a_request_with_done_cancelled(host):
    replies = asyncio.run(serve(host, {b"c": (generate("c", max_tokens=400), None)}, cancel_after={b"c": 1}))[b"c"]
    assert replies[-1]["type"] == "done" and replies[-1]["finish_reason"] == "cancelled"
    assert len(replies) < 400


def test_drop_and_a_subscriber_that_leaves_end_requests_without_replies(host):
    async def run():
        got = await serve(host, {b"d": (generate("d", max_tokens=400), None),
                                 b"e": (generate("e", max_tokens=400), None)}, leave_after=1)
        return got

    asyncio.run(run())  # left after the first batch: both requests are dropped
    wait_until(lambda: host.service.requests.num_open == 0, timeout=30)
    wait_until(lambda: host.stats()["kv_blocks_in_use"] == 0 and host.stats()["running"] == 0, timeout=30)

    async def drop_one():
        channel = host.subscribe()
        pending = asyncio.ensure_future(channel.__anext__())
        host.open(b"f", generate("f", max_tokens=400))
        await pending
        host.drop(b"f")
        wait_until(lambda: host.service.requests.num_open == 0, timeout=30)
        await channel.aclose()

    asyncio.run(drop_one())
    wait_until(lambda: host.stats()["kv_blocks_in_use"] == 0, timeout=30)


def test_a_refused_request_gets_its_error_through_the_channel(host):
    got = asyncio.run(serve(host, {b"x": (encode({"type": "generate", "id": "bad", "prompt_token_ids": [10**6]}),
                                          None)}))[b"x"]
    assert len(got) == 1 and got[0]["type"] == "error" and got[0]["code"] == "bad_request" and got[0]["id"] == "bad"


@dataclass
class Note:
    id: protocol.ClientId


def test_message_types_the_service_handles_reach_it_and_answer(host, monkeypatch):
    """The way a type added to the protocol travels: validated, handed to ``EngineService.forward``, and
    the replies it sends returned to the caller."""
    monkeypatch.setitem(protocol.SCHEMAS, "note", (Note, {"id": protocol.client_id}, ("id",)))
    monkeypatch.setattr(host.service, "forward", lambda peer, req: host.service.send(peer, {"type": "noted",
                                                                                             "id": req.id}))
    assert asyncio.run(host.call(PEER, encode({"type": "note", "id": 5, "affinity": "npc"}))) == [
        {"type": "noted", "id": 5}]
    assert asyncio.run(host.call(PEER, encode({"type": "ping", "id": 6}))) == [{"type": "pong", "id": 6}]
    refused = asyncio.run(host.call(PEER, encode({"type": "nonsense", "id": 7})))
    assert refused[0]["code"] == "unknown_type" and refused[0]["id"] == 7


async def until(condition, timeout: float = 30.0) -> None:
    """``wait_until`` for a coroutine: the host's loop must stay free to relay replies meanwhile."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_saved_states_pins_and_injections_work_on_a_replica(host):
    """Snapshot and restore open requests like a generation; a pin is held under the restore's own peer,
    and released when that peer is dropped (``release`` through the front end, or its client left) or
    when the front end's subscription ends. An ``inject`` reaches the generation it names."""
    prompt = list(range(3, 43))
    snap = asyncio.run(serve(host, {b"s": (encode({"type": "snapshot", "id": "s", "prompt_token_ids": prompt}),
                                           None)}))[b"s"]
    assert [m["type"] for m in snap] == ["snapshot"] and snap[0]["tokens"] == 32
    restore = encode({"type": "restore", "id": "r", "state": snap[0]["state"], "pin": True, "affinity": "npc"})

    async def run() -> list[dict]:
        channel = host.subscribe()
        pending = asyncio.ensure_future(channel.__anext__())
        host.open(b"p", restore)
        assert [m for _, m in await pending] == [{"type": "restored", "id": "r", "tokens": 32, "pinned": True}]
        await until(lambda: host.stats()["pinned_states"] == 1)
        host.drop(b"p")
        await until(lambda: host.stats()["pinned_states"] == 0)
        host.open(b"i", generate("i", max_tokens=200, prompt_token_ids=prompt))
        got: list[dict] = []
        while not got or got[-1]["type"] != "done":
            first = not got
            got += [m for _, m in await channel.__anext__()]
            if first:  # while it runs (200 tokens are far more than one batch of replies)
                assert await host.call(b"i", encode({"type": "inject", "id": "i", "token_ids": [7, 8, 9]})) == []
        host.open(b"q", restore)
        assert [m["pinned"] for _, m in await channel.__anext__()] == [True]
        await until(lambda: host.stats()["pinned_states"] == 1)
        await channel.aclose()  # the front end is gone: nobody is left to release it
        await until(lambda: host.stats()["pinned_states"] == 0)
        return got

    got = asyncio.run(run())
    assert sum(m.get("injected", 0) for m in got[:-1]) == 3 and got[-1]["usage"]["injected_tokens"] == 3


def test_adapters_load_and_serve_on_a_replica(host, tiny, tmp_path):
    """``load_adapter`` / ``unload_adapter`` reach the replica's engine (the front end sends them to every
    replica), and a request naming the adapter runs under it there."""
    import transformers

    from lora_fixtures import make_adapter

    make_adapter(transformers.AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "npc", seed=1)
    load = encode({"type": "load_adapter", "id": 1, "name": "npc", "path": str(tmp_path / "npc")})
    assert asyncio.run(host.call(PEER, load)) == [{"type": "adapters", "id": 1, "adapters": ["npc"]}]
    assert host.service.model_info()["adapters"] == ["npc"]
    got = asyncio.run(serve(host, {b"a": (generate("a", max_tokens=8, adapter="npc"), None),
                                   b"b": (generate("b", max_tokens=8), None)}))
    local = LLMEngine(tiny, GeneratorParams(max_batch_size=4, max_seq_len=512), dtype=torch.float32,
                      adapters={"npc": tmp_path / "npc"})
    for peer, adapter in ((b"a", "npc"), (b"b", None)):
        want = local.generate([GenerationRequest(prompt_token_ids=[3, 1, 4, 1, 5], max_new_tokens=8, temperature=0,
                                                 ignore_eos=True, adapter=adapter)])[0].token_ids
        assert [m["token_id"] for m in got[peer] if m["type"] == "token"] == want
    unload = encode({"type": "unload_adapter", "id": 2, "name": "npc"})
    assert asyncio.run(host.call(PEER, unload)) == [{"type": "adapters", "id": 2, "adapters": []}]
    again = asyncio.run(host.call(PEER, unload))
    assert again[0]["code"] == "bad_request" and "no adapter named 'npc'" in again[0]["message"]
