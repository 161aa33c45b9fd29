"""The DEALER socket options both Python clients use, for a runtime that may stall, die or restart."""

from __future__ import annotations

import zmq

HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 20_000  # generous: a busy machine must never look like a dead runtime


def configure(socket: zmq.Socket) -> None:
    """Set a client's DEALER up before it connects.

    * ``IMMEDIATE``: messages go only to a live connection. While the runtime is down a send waits (up to
      the client's timeout) instead of queueing requests that a restarted runtime would run long after
      their caller gave up, and nothing meant for an old connection is replayed to a new one.
    * ``RCVHWM`` 0: libzmq's I/O thread takes every reply as it arrives, so a program that stops reading
      for a while (a loading screen) never leaves its replies waiting on the runtime's side, where they
      count against the runtime's ``slow_client`` limits.
    * ZMTP heartbeats: a runtime that stops answering (frozen, its host gone) is dropped and reconnected
      to, like one whose process ended (the OS reports that at once); libzmq reconnects on its own.
    * ``LINGER`` 0: closing never waits for unsent messages.
    """
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
