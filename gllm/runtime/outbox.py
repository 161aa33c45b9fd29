"""Per-client outboxes: replies that a slow reader could not take yet wait here, in order, within bounds.

The server sends with ``ROUTER_MANDATORY`` and ``NOBLOCK``, so a send to a client whose libzmq queue and
socket buffer are full fails at once (``zmq.Again``) instead of blocking the engine or being dropped. The
reply then waits in that client's outbox, and every later reply to the same client queues behind it, so a
client that stops reading for a while (a loading screen) still gets every reply, in order, once it reads
again. The server calls ``flush`` every turn of its loop.

An outbox that takes nothing for ``timeout_s`` seconds, or holds more than ``max_bytes``, is ``stuck``:
the server then cancels the client's requests and swaps its backlog for their errors (``replace``). An
outbox that was swapped that way and gets stuck again is dropped: its client reads nothing at all.
"""

from __future__ import annotations

import collections
import time

import zmq


class Outbox:
    __slots__ = ("replies", "num_bytes", "since", "replaced")

    def __init__(self) -> None:
        self.replies: collections.deque[bytes] = collections.deque()
        self.num_bytes = 0
        self.since = time.monotonic()  # the last time this client took a reply (or the outbox was filled anew)
        self.replaced = False


class Outboxes:
    """The outboxes of every client that has replies waiting, by routing id."""

    def __init__(self, socket: zmq.Socket, max_bytes: int, timeout_s: float):
        self.socket = socket
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._boxes: dict[bytes, Outbox] = {}

    @property
    def pending(self) -> bool:
        return bool(self._boxes)

    @property
    def num_clients(self) -> int:
        return len(self._boxes)

    @property
    def num_replies(self) -> int:
        return sum(len(box.replies) for box in self._boxes.values())

    def send(self, peer: bytes, body: bytes) -> bool:
        """Send now, or queue behind the client's waiting replies; False when the client is not connected."""
        box = self._boxes.get(peer)
        if box is None:
            try:
                self.socket.send_multipart([peer, body], zmq.NOBLOCK)
                return True
            except zmq.Again:
                box = self._boxes[peer] = Outbox()
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    return False
                raise
        box.replies.append(body)
        box.num_bytes += len(body)
        return True

    def flush(self) -> list[bytes]:
        """Send what each client takes now, oldest first; returns the clients found disconnected."""
        gone = []
        for peer, box in list(self._boxes.items()):
            try:
                while box.replies:
                    self.socket.send_multipart([peer, box.replies[0]], zmq.NOBLOCK)
                    box.num_bytes -= len(box.replies.popleft())
                    box.since = time.monotonic()
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                gone.append(peer)
            del self._boxes[peer]
        return gone

    def stuck(self) -> list[tuple[bytes, str]]:
        """Clients past a bound, each with the reason in words."""
        now = time.monotonic()
        out = []
        for peer, box in self._boxes.items():
            if box.num_bytes > self.max_bytes:
                out.append((peer, f"{box.num_bytes} bytes of replies waited for this client; the limit is "
                                  f"{self.max_bytes} (gllm serve --max-outbox-size)"))
            elif now - box.since > self.timeout_s:
                out.append((peer, f"this client took no reply for {now - box.since:.1f} s; the limit is "
                                  f"{self.timeout_s:g} s (gllm serve --slow-client-timeout)"))
        return out

    def was_replaced(self, peer: bytes) -> bool:
        box = self._boxes.get(peer)
        return box is not None and box.replaced

    def replace(self, peer: bytes, bodies: list[bytes]) -> None:
        """Drop the client's backlog and queue ``bodies`` instead, with a fresh time limit."""
        box = self._boxes[peer] = Outbox()
        box.replies.extend(bodies)
        box.num_bytes = sum(map(len, bodies))
        box.replaced = True

    def drop(self, peer: bytes) -> None:
        self._boxes.pop(peer, None)
