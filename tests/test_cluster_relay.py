"""The relay between the cluster's front end and its replicas, against a stand-in for Serve's handle that
records what each replica is sent: no Ray cluster is started."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("ray", reason="the cluster is an optional extra (pip install 'gllm[cluster]')")

from gllm.cluster.board import BOARD  # noqa: E402
from gllm.cluster.relay import Job, Relay  # noqa: E402
from gllm.cluster.router import Router  # noqa: E402
from gllm.runtime import protocol  # noqa: E402


class Call:
    def __init__(self, fn):
        self.remote = fn


class Replies:
    """A replica's reply stream: its id, then nothing until cancelled."""

    def __init__(self, replica: str):
        self.first = replica

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.first is not None:
            first, self.first = self.first, None
            return first
        await asyncio.sleep(3600)
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


class FakeHandle:
    def __init__(self):
        self.sent: list[tuple[str, str, bytes, bytes]] = []  # (replica, call, peer, frame)
        self.resumed: list[tuple] = []  # each open's (tokens, injected)
        self.streams: dict[str, object] = {}  # a replica's reply stream, when not a quiet one
        self.replies = Call(lambda route: self.streams.get(route) or Replies(route))
        self.open = Call(self._open)
        self.call = Call(self._call)
        self.drop = Call(self._drop)

    def options(self, **_):
        return self

    async def _open(self, key: bytes, frame: bytes, tokens, injected, route: str) -> str:
        self.sent.append((route, "open", key, frame))
        self.resumed.append((tokens, injected))
        return route

    async def _call(self, peer: bytes, frame: bytes, route: str) -> list:
        self.sent.append((route, "call", peer, frame))
        msg = protocol.decode(frame)
        if msg["type"] in ("load_adapter", "unload_adapter"):  # as a replica answers them
            return [protocol.adapters_message(msg.get("id"), [msg["name"]] if msg["type"] == "load_adapter" else [])]
        return []

    async def _drop(self, key: bytes, route: str) -> None:
        return None


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the relay did not get there"
        time.sleep(0.02)


def test_a_message_about_a_waiting_request_follows_it_to_its_replica():
    """An ``inject`` sent while its generation still waits for a replica is held, then sent to the replica
    the generation opens on, under the generation's own key, after the ``open``."""
    handle = FakeHandle()
    BOARD.publish({})
    relay = Relay(handle, Router(capacity=4, max_imbalance=4), lambda key, peer, msg: None)
    try:
        generate = protocol.encode({"type": "generate", "id": "g", "prompt": "Halt!"})
        relay.open(Job("k1", b"client", "g", generate, None, []))
        inject = protocol.encode({"type": "inject", "id": "g", "token_ids": [7, 8]})
        relay.forward(b"client", "g", inject, None, "k1")
        time.sleep(0.6)  # a few of the relay's refreshes: no replica, so nothing may have been sent
        assert handle.sent == []
        BOARD.publish({"r1": {}})
        wait_for(lambda: len(handle.sent) >= 2)
        assert handle.sent == [("r1", "open", b"k1", generate), ("r1", "call", b"k1", inject)]
    finally:
        relay.stop()
        BOARD.publish({})


class DyingReplies:
    """A replica's reply stream that streams the tokens its script gives, each once the condition before it
    holds, and then fails as Ray does when the actor dies."""

    def __init__(self, replica: str, script):
        self.replica, self.script = replica, script

    def __aiter__(self):
        return self._run()

    async def _run(self):
        yield self.replica
        for condition, batch in self.script:
            while not condition():
                await asyncio.sleep(0.01)
            yield batch
        from ray.exceptions import RayActorError

        raise RayActorError()

    def cancel(self) -> None:
        pass


def token(index: int, token_id: int, **extra) -> dict:
    return {"type": "token", "id": "g", "index": index, "token_id": token_id, "text": f"<{token_id}>",
            "logprob": -0.5, "rank": 1, **extra}  # fmt: skip


def test_a_failover_carries_the_injections_to_the_next_replica():
    """Tokens streamed with an injection before one of them, a second injection that no token followed,
    then the replica dies: the request opens on the next replica with the tokens and the first injection in
    its place, and the second injection is sent there again after the open. Clients never see the ids."""
    handle = FakeHandle()
    calls = lambda replica: [s for s in handle.sent if s[0] == replica and s[1] == "call"]  # noqa: E731
    handle.streams["r1"] = DyingReplies("r1", [
        (lambda: handle.sent, [(b"k1", token(0, 5))]),
        (lambda: len(calls("r1")) >= 1, [(b"k1", token(1, 6, injected=2, injected_ids=[[7, 8]]))]),
        (lambda: len(calls("r1")) >= 2, [(b"k1", token(2, 9))]),
    ])
    delivered = []
    BOARD.publish({"r1": {}})
    relay = Relay(handle, Router(capacity=4, max_imbalance=4), lambda key, peer, msg: delivered.append(msg))
    try:
        generate = protocol.encode({"type": "generate", "id": "g", "prompt": "Halt!"})
        relay.open(Job("k1", b"client", "g", generate, None, []))
        wait_for(lambda: len(delivered) >= 1)
        first = protocol.encode({"type": "inject", "id": "g", "token_ids": [7, 8]})
        relay.forward(b"client", "g", first, None, "k1")
        wait_for(lambda: len(delivered) >= 2)
        second = protocol.encode({"type": "inject", "id": "g", "text": " The gate opens."})
        relay.forward(b"client", "g", second, None, "k1")
        wait_for(lambda: len(delivered) >= 3)
        BOARD.publish({"r1": {}, "r2": {}})
        wait_for(lambda: len(calls("r2")) >= 1)
        assert [s[:2] for s in handle.sent if s[0] == "r2"] == [("r2", "open"), ("r2", "call")]
        assert handle.resumed[-1] == ([(5, -0.5, 1), (6, -0.5, 1), (9, -0.5, 1)], [(1, [7, 8])])
        assert calls("r2") == [("r2", "call", b"k1", second)]
        assert [m["token_id"] for m in delivered] == [5, 6, 9]
        assert delivered[1]["injected"] == 2 and not any("injected_ids" in m for m in delivered)
    finally:
        relay.stop()
        BOARD.publish({})


def test_a_replica_that_connects_later_loads_the_adapters_first():
    """An adapter loaded at run time on every replica is loaded on one that Serve starts later (in place of
    a lost one) before any request may go there."""
    handle = FakeHandle()
    delivered = []
    BOARD.publish({"r1": {}})
    relay = Relay(handle, Router(capacity=4, max_imbalance=4), lambda key, peer, msg: delivered.append(msg))
    try:
        wait_for(lambda: "r1" in relay._connected)
        load = protocol.LoadAdapter(name="chess", path="/srv/lora/chess", id=1)
        relay.change_adapter(b"client", load, protocol.encode({"type": "load_adapter", "id": 1, "name": "chess",
                                                               "path": "/srv/lora/chess"}))  # fmt: skip
        wait_for(lambda: delivered)
        assert delivered == [protocol.adapters_message(1, ["chess"])]
        BOARD.publish({"r1": {}, "r2": {}})
        wait_for(lambda: "r2" in relay._connected)
        to_r2 = [protocol.decode(frame) for replica, _, _, frame in handle.sent if replica == "r2"]
        assert to_r2 == [{"type": "unload_adapter", "name": "chess"},
                         {"type": "load_adapter", "name": "chess", "path": "/srv/lora/chess"}]
    finally:
        relay.stop()
        BOARD.publish({})
