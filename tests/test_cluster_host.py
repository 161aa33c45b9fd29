"""What runs inside each replica, without Ray: the engine on its thread behind ``EngineService``, streams
matched to their callers, cancels, callers that leave, and message types handled by the service."""

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


async def collect(host: ReplicaHost, frame: bytes, resume=None) -> list[dict]:
    return [msg async for batch in host.stream(PEER, frame, resume) for msg in batch]


def test_a_stream_carries_one_request_s_replies_in_order(host, tiny):
    async def both():
        return await asyncio.gather(collect(host, generate(1, max_tokens=30)),
                                    collect(host, generate("1", max_tokens=12)))  # 1 and "1" are two ids

    first, second = asyncio.run(both())
    expected = engine(tiny).generate([GenerationRequest(prompt_token_ids=[3, 1, 4, 1, 5], max_new_tokens=30,
                                                       temperature=0, ignore_eos=True)])[0]
    assert [m["token_id"] for m in first[:-1]] == expected.token_ids
    assert [m["index"] for m in first[:-1]] == list(range(30)) and first[-1]["type"] == "done"
    assert all(m["id"] == "1" for m in second) and len(second) == 13


def test_a_resumed_stream_starts_after_the_tokens_given(host):
    whole = asyncio.run(collect(host, generate("w", max_tokens=20)))[:-1]
    given = [(m["token_id"], m["logprob"], m["rank"]) for m in whole[:8]]
    rest = asyncio.run(collect(host, generate("r", max_tokens=20), resume=given))
    assert [m["index"] for m in rest[:-1]] == list(range(8, 20))
    assert [m["token_id"] for m in rest[:-1]] == [m["token_id"] for m in whole[8:]]
    assert rest[-1]["usage"]["completion_tokens"] == 20


def test_cancel_ends_the_stream_with_done_cancelled(host):
    async def run():
        stream = host.stream(PEER, generate("c", max_tokens=400))
        first = await stream.__anext__()
        assert await host.call(PEER, encode({"type": "cancel", "id": "c"})) == []
        rest = [msg async for batch in stream for msg in batch]
        return first + rest

    replies = asyncio.run(run())
    assert replies[-1]["type"] == "done" and replies[-1]["finish_reason"] == "cancelled"
    assert len(replies) < 400


def test_a_caller_that_leaves_drops_its_request(host):
    async def run():
        stream = host.stream(PEER, generate("gone", max_tokens=400))
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(run())
    wait_until(lambda: host.stats()["kv_blocks_in_use"] == 0 and host.stats()["running"] == 0, timeout=30)
    assert host.service.requests.num_open == 0


def test_a_refused_request_gets_its_error_on_its_stream(host):
    replies = asyncio.run(collect(host, encode({"type": "generate", "id": "bad", "prompt_token_ids": [10**6]})))
    assert len(replies) == 1 and replies[0]["type"] == "error" and replies[0]["code"] == "bad_request"
    assert replies[0]["id"] == "bad"


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
