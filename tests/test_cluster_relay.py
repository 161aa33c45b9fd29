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
        self.replies = Call(lambda route: Replies(route))
        self.open = Call(self._open)
        self.call = Call(self._call)
        self.drop = Call(self._drop)

    def options(self, **_):
        return self

    async def _open(self, key: bytes, frame: bytes, tokens, route: str) -> str:
        self.sent.append((route, "open", key, frame))
        return route

    async def _call(self, peer: bytes, frame: bytes, route: str) -> list:
        self.sent.append((route, "call", peer, frame))
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
