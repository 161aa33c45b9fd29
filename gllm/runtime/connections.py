"""Which clients' connections have ended: libzmq's socket monitor, mapped back to routing ids.

A ROUTER names each client by a routing id, but learns of a closed connection only through its socket
monitor, whose ``DISCONNECTED`` event carries the connection's file descriptor. (``ROUTER_NOTIFY`` would
deliver the routing id directly, but it is a draft option that the libzmq in pyzmq's wheels does not
build.) Every received message can tell the descriptor it arrived on (``ZMQ_SRCFD``), so the tracker
records, for each routing id, the connection it spoke on.

The OS reuses a descriptor number as soon as it is closed, so one number names many connections over
time. A connection is therefore ``(fd, generation)``: the n-th ``ACCEPTED`` event on an fd opens
generation n and the n-th ``DISCONNECTED`` event on it closes generation n. libzmq emits ``ACCEPTED``
before the connection can deliver a message, so reading the monitor before registering a new routing id
always finds its connection's generation already counted.

The same descriptors tell how much the runtime has written to a client that the client has not read yet
(``unread_bytes``; Linux's ``TIOCOUTQ``), which a shutdown waits for: libzmq's own linger does not hold the
process for ``ipc://`` connections, so replies handed to libzmq could otherwise be lost at exit.

What this covers: a client closing its socket, a killed client process (the OS closes its connections),
a message over ``MAXMSGSIZE`` (libzmq drops the connection), and, with ZMTP heartbeats enabled on the
ROUTER, a peer that stops answering (host gone, network cut).
"""

from __future__ import annotations

import collections
import struct

import zmq
from zmq.utils.monitor import recv_monitor_message

try:
    import fcntl
    import termios
except ImportError:  # not a POSIX system: unread bytes cannot be told
    fcntl = termios = None

Connection = tuple[int, int]  # (file descriptor, generation)


class ConnectionTracker:
    """Maps routing ids to connections; ``gone()`` names the routing ids whose connection has ended."""

    def __init__(self, router: zmq.Socket, context: zmq.Context):
        address = f"inproc://gllm-monitor-{id(self)}"
        router.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.socket = context.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # never let libzmq drop a monitor event for want of room
        self.socket.connect(address)
        self._router = router
        self._opened: collections.Counter[int] = collections.Counter()
        self._closed: collections.Counter[int] = collections.Counter()
        self._connection_of: dict[bytes, Connection] = {}
        self._peers_on: dict[Connection, set[bytes]] = {}
        self._gone: list[bytes] = []

    def seen(self, peer: bytes, frame: zmq.Frame) -> None:
        """Record that ``peer`` sent ``frame`` (a received message); call it before acting on the message."""
        if peer in self._connection_of:
            return
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:  # no descriptor: an inproc peer, which the monitor never reports
            return
        self._read_events()
        if self._closed[fd] >= self._opened[fd]:  # its connection has ended already: it was a last message
            self._gone.append(peer)
            return
        connection = (fd, self._opened[fd])
        self._connection_of[peer] = connection
        self._peers_on.setdefault(connection, set()).add(peer)

    def admits(self, peer: bytes, max_peers: int) -> bool:
        """Whether ``peer`` may be served: it is known already, or fewer than ``max_peers`` peers are connected."""
        if peer in self._connection_of:
            return True
        self._read_events()
        return len(self._connection_of) < max_peers

    def gone(self) -> list[bytes]:
        """Routing ids whose connection has ended since the last call."""
        self._read_events()
        gone, self._gone = self._gone, []
        return gone

    def unread_bytes(self) -> int:
        """Bytes written to the open connections of known clients that those clients have not read yet, as far
        as the OS tells (0 where it cannot): what is still in the kernel's queue, and so also a sign that
        libzmq may hold more behind it."""
        self._read_events()
        return sum(_queued_bytes(fd) for fd, _ in self._peers_on)

    def close(self) -> None:
        self._router.disable_monitor()
        self.socket.close(linger=0)

    def _read_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._opened[fd] += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._closed[fd] += 1
                for peer in self._peers_on.pop((fd, self._closed[fd]), ()):
                    del self._connection_of[peer]
                    self._gone.append(peer)


def _queued_bytes(fd: int) -> int:
    """Bytes in the send queue of socket ``fd`` not yet taken by the other end (0 when unknown)."""
    if fcntl is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
