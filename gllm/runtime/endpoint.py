"""The client side of ``gllm serve``: one ZeroMQ ROUTER socket speaking protocol v1, driven by one loop.

Each turn of the loop takes every message that has arrived, lets the subclass do one turn of its work (an
engine step for ``Server``, replies from the replicas for the cluster's front end), and sends what that
produced. While work is waiting the sockets are polled without waiting; otherwise the loop blocks on them
(with a short timeout, so that a shutdown request is noticed). Every send is non-blocking: replies that a
slow reader cannot take yet wait in its outbox (see ``outbox``) and are retried every turn; a client that is
gone, or that stays behind past the outbox's bounds (``slow_client``), has its requests ended.

How a vanished client is noticed, all by libzmq itself:
* the socket monitor's ``DISCONNECTED`` events, mapped to routing ids by ``ConnectionTracker``. A killed
  process's connections are closed by the OS, so its requests are cancelled within milliseconds;
* ZMTP heartbeats: a peer that stops answering PINGs (host gone, network cut) is disconnected, which again
  produces a ``DISCONNECTED`` event. A PING waits behind the replies a peer has not read, so a slow reader
  cannot answer either: the timeout is twice ``slow_client_timeout_s``, leaving a slow reader the time to be
  cut off by its outbox's bounds (freeing its blocks) and still read its ``slow_client`` errors;
* ``ROUTER_MANDATORY``: a send to a peer that is no longer connected raises instead of dropping silently.

What a request *does* is the subclass's: ``submit`` opens one (``generate``, ``score``, ``snapshot``,
``restore``), ``cancel`` asks it to end with ``done{cancelled}``, ``abandon`` stops it without a reply (its
client is gone), ``forward`` handles any other message type (``inject``, ``release``, ``load_adapter``,
``unload_adapter``: those two only from a client allowed to make the runtime read files), ``peer_gone`` lets
go of what a vanished client kept (its pinned states), and ``info`` answers ``info``. Admission (sizes,
duplicate ids, open requests per client, clients at once) and the bookkeeping of open requests are here,
the same for both.
"""

from __future__ import annotations

import abc
import collections
import logging
import time
from typing import Any

import zmq

from gllm.runtime import adapters, admission, protocol
from gllm.runtime.access import CurveServer, is_local
from gllm.runtime.connections import ConnectionTracker
from gllm.runtime.limits import ServerLimits
from gllm.runtime.outbox import Outboxes
from gllm.runtime.protocol import ProtocolError
from gllm.runtime.requests import OpenRequest, OpenRequests

log = logging.getLogger(__name__)

IDLE_POLL_MS = 100  # how long an idle loop blocks before it looks at the shutdown flag again
MAX_DRAIN = 1024  # messages taken per turn, so a flood cannot starve the work
HEARTBEAT_IVL_MS = 1000
MIN_HEARTBEAT_TIMEOUT_MS = 3000
# libzmq's own queue and the kernel's socket buffer per client are kept small, so that a backlog waits in the
# client's outbox, where its bounds apply, rather than in megabytes of auto-sized kernel buffer.
SEND_HWM = 256  # above the replies one step makes for a client (one per open request)
SEND_BUFFER_BYTES = 32 << 10
FLUSH_RETRY_MS = 10  # how long an idle loop blocks while replies wait in outboxes
CLOSE_LINGER_MS = 1000  # time given to the last replies to leave when the loop ends other than by a shutdown


class Endpoint(abc.ABC):
    """Serves protocol v1 on one endpoint until ``stop`` is called; subclasses say what requests do.

    Shutdown has two phases. The grace period (``shutdown_grace_s``): no new requests, the open ones run on;
    at its end those still open are abandoned and their clients get ``shutting_down``. The drain
    (``shutdown_drain_s`` more): nothing runs, but replies still waiting for clients (a slow reader's
    backlog, then its ``done`` or error) are delivered as the clients read them. The loop ends as soon as
    nothing is open and every reply has been read (or at least taken by the OS, where it cannot tell), and
    at the latest when the drain ends. A second ``stop`` ends the grace period at once, a third the drain.
    """

    def __init__(self, endpoint: str, limits: ServerLimits = ServerLimits(), context: zmq.Context | None = None,
                 curve: CurveServer | None = None):
        self.limits = limits
        self.adapter_loading = curve is not None or is_local(endpoint)  # clients may make the runtime read files
        self.requests = OpenRequests()
        # A context of its own unless one is given: ending it at shutdown is what makes libzmq deliver the
        # replies still queued in it (within the linger time) before the process leaves.
        self._own_context = context is None
        context = context or zmq.Context()
        self._authenticator = curve.start_authenticator(context) if curve else None
        self.socket = self._bind(context, endpoint, curve)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.connections = ConnectionTracker(self.socket, context)
        self.outboxes = Outboxes(self.socket, limits.max_outbox_bytes, limits.slow_client_timeout_s)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self.connections.socket, zmq.POLLIN)
        self._stop_requests = 0
        self._grace_end: float | None = None  # set by the first stop
        self._drain_end: float | None = None
        self._draining = False
        self._quiet_checks = 0  # drain checks in a row that found nothing left to deliver
        self.counters: collections.Counter[str] = collections.Counter()

    def _bind(self, context: zmq.Context, endpoint: str, curve: CurveServer | None) -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        if curve:
            curve.apply(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.hard_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(MIN_HEARTBEAT_TIMEOUT_MS,
                                                   int(2000 * self.limits.slow_client_timeout_s)))
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.SNDBUF, SEND_BUFFER_BYTES)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            if self._authenticator:
                self._authenticator.stop()
            if self._own_context:
                context.term()
            raise
        return sock

    # ------------------------------------------------------------------------------- what subclasses do
    def busy(self) -> bool:
        """Whether work is waiting, so the loop must not block on the sockets."""
        return False

    def work(self) -> None:
        """One turn of work, after the turn's messages have been handled."""

    @abc.abstractmethod
    def submit(self, peer: bytes, req: protocol.Generate | protocol.Score | protocol.Snapshot | protocol.Restore,
               msg: dict[str, Any]) -> None:
        """Open an admitted request (one of ``protocol.OPENING``; ``msg`` is the decoded map); raise
        ``ProtocolError`` to refuse it, having changed nothing."""

    @abc.abstractmethod
    def cancel(self, req: OpenRequest) -> None:
        """The client's ``cancel``: end ``req`` soon with ``done{cancelled}``."""

    @abc.abstractmethod
    def abandon(self, req: OpenRequest) -> None:
        """Stop ``req``'s work; it is orphaned already and nobody gets its replies."""

    def forward(self, peer: bytes, req: protocol.Request, msg: dict[str, Any]) -> None:
        """Any message type other than ``ping``, ``info``, ``cancel`` and those that open a request."""
        raise ProtocolError("unknown_type", f"this runtime does not handle {type(req).__name__} messages",
                            getattr(req, "id", None))

    def peer_gone(self, peer: bytes) -> None:
        """The client is gone (its open requests were abandoned already): let go of what it kept."""

    @abc.abstractmethod
    def info(self, request_id: protocol.ClientId | None) -> dict[str, Any]:
        """The ``info`` reply to ``request_id``."""

    def client_stats(self) -> dict[str, int]:
        """The ``info`` statistics this side keeps: open requests, clients, disconnects, slow readers."""
        return {"open_requests": self.requests.num_open, "clients": self.requests.num_peers,
                "disconnects": self.counters["disconnects"], "queued_replies": self.outboxes.num_replies,
                "slow_clients": self.counters["slow_clients"]}

    # ---------------------------------------------------------------------------------------- the loop
    def stop(self) -> None:
        """Ask the loop to shut down; safe to call from a signal handler. A second call ends the grace."""
        self._stop_requests += 1

    @property
    def stopping(self) -> bool:
        return bool(self._stop_requests)

    def run(self) -> None:
        try:
            while self._keep_running():
                self._receive(self._wait_ms())
                self.work()
                self._flush()
        finally:
            self.close()
        log.info("stopped")

    def close(self) -> None:
        """Close the sockets (``run`` does at its end); replies still queued get until the drain ends."""
        self.connections.close()
        self.socket.close(linger=self._linger_ms())
        if self._authenticator:
            self._authenticator.stop()
        if self._own_context:
            self.socket.context.term()  # returns once the queued replies are out or the linger is over

    def poll_also(self, sock: zmq.Socket) -> None:
        """Wake the loop when ``sock`` has a message too (the subclass reads it in ``work``)."""
        self._poller.register(sock, zmq.POLLIN)

    def _keep_running(self) -> bool:
        if not self._stop_requests:
            return True
        now = time.monotonic()
        if self._grace_end is None:
            self._grace_end = now + self.limits.shutdown_grace_s
            self._drain_end = self._grace_end + self.limits.shutdown_drain_s
            log.info("shutting down: %d request(s) in flight, %.1f s to finish", self.requests.num_open,
                     self.limits.shutdown_grace_s)
        if self._stop_requests > 1:
            self._grace_end = min(self._grace_end, now)
        if self._stop_requests > 2:
            self._drain_end = min(self._drain_end, now)
        if self.requests.num_open and now >= self._grace_end:
            self.end_all("shutting_down", "the runtime shut down before this request finished")
        if self.requests.num_open:
            return True
        if not self._draining:
            self._draining = True
            log.info("grace period over; replies wait for %d client(s), for at most %.1f s",
                     self.outboxes.num_clients, max(0.0, self._drain_end - now))
        if now >= self._drain_end:
            return False
        if self.outboxes.pending or self.connections.unread_bytes():
            self._quiet_checks = 0
            return True
        # Nothing in the outboxes nor in the OS's queues. libzmq hands its queue to the OS as soon as there is
        # room, so a second look a turn later confirms that it holds nothing either.
        self._quiet_checks += 1
        return self._quiet_checks < 2

    def end_all(self, code: str, message: str) -> None:
        """Abandon every open request, each client getting an ``error`` with ``code`` for each of its own."""
        for req in self.requests.orphan_all():
            self.abandon(req)
            self.send(req.peer, protocol.error_message(code, message, req.client_id))

    def _linger_ms(self) -> int:
        """How long libzmq may still deliver queued replies once the loop has ended: until the drain ends."""
        if self._drain_end is None:
            return CLOSE_LINGER_MS
        return max(0, int(1000 * (self._drain_end - time.monotonic())))

    def _wait_ms(self) -> int:
        """How long to block for messages: not at all while work waits. A ROUTER's POLLOUT means *some*
        client has room, so it cannot wait for a slow one: outboxes are retried on a short timer."""
        if self.busy():
            return 0
        return FLUSH_RETRY_MS if self.outboxes.pending else IDLE_POLL_MS

    def _receive(self, timeout_ms: int) -> None:
        if not self._poller.poll(timeout_ms):
            return
        for _ in range(MAX_DRAIN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            peer = frames[0].bytes
            if not self.connections.admits(peer, self.limits.max_clients):
                self._refuse_client(peer, frames[-1].bytes)
                continue
            self.connections.seen(peer, frames[-1])
            self._handle(peer, [f.bytes for f in frames[1:]])
        for peer in self.connections.gone():
            self.counters["disconnects"] += 1
            self._drop_peer(peer)

    # --------------------------------------------------------------------------------- client messages
    def _handle(self, peer: bytes, body: list[bytes]) -> None:
        request_id = None
        try:
            if len(body) != 1:
                raise ProtocolError("bad_request", f"send one frame per message (got {len(body)} frames): "
                                                   "connect with a DEALER socket and send the msgpack map alone")
            msg, req = admission.read_message(body[0], self.limits)
            request_id = getattr(req, "id", None)
            self._dispatch(peer, req, msg)
        except ProtocolError as exc:
            self.send(peer, protocol.error_message(exc.code, exc.message, exc.request_id))
        except Exception:  # a bug of ours must not take the server down with it
            log.exception("internal error while handling a message from client %s", peer.hex())
            self.send(peer, protocol.error_message(
                "internal", "the runtime failed on this message; see its log", request_id))

    def _dispatch(self, peer: bytes, req: protocol.Request, msg: dict[str, Any]) -> None:
        if isinstance(req, protocol.Ping):
            self.send(peer, protocol.pong_message(req.id))
        elif isinstance(req, protocol.Info):
            self.send(peer, self.info(req.id))
        elif isinstance(req, protocol.Cancel):
            open_req = self.requests.find(peer, req.id)
            if open_req is not None:  # unknown or finished ids are fine: cancel is idempotent
                self.cancel(open_req)
        elif isinstance(req, protocol.OPENING):
            if self._stop_requests:
                raise ProtocolError("shutting_down", "the runtime is shutting down and takes no new requests",
                                    req.id)
            admission.check_open(self.requests, peer, req.id, self.limits)
            self.submit(peer, req, msg)
        else:
            adapters.check_allowed(req, self.adapter_loading)
            self.forward(peer, req, msg)

    def _refuse_client(self, peer: bytes, frame: bytes) -> None:
        """Answer a client beyond ``max_clients`` with ``overloaded``; it stays unknown to the runtime."""
        exc = admission.over_limit("overloaded", "max_clients", self.limits,
                                   f"the runtime already serves {self.limits.max_clients} clients",
                                   admission.peek_id(frame, self.limits))
        self.send(peer, protocol.error_message(exc.code, exc.message, exc.request_id))

    # ------------------------------------------------------------------------------ sends, disconnects
    def send(self, peer: bytes, message: dict[str, Any]) -> None:
        """Send without blocking, or queue in the client's outbox; a client that is gone loses its requests."""
        if not self.outboxes.send(peer, protocol.encode(message)):
            self._drop_peer(peer)

    def _flush(self) -> None:
        """Retry the outboxes; cut off the clients that stay behind past their bounds."""
        for peer in self.outboxes.flush():
            self._drop_peer(peer)
        for peer, why in self.outboxes.stuck():
            self._cut_off(peer, why)

    def _cut_off(self, peer: bytes, why: str) -> None:
        """Cancel a slow reader's requests and swap the replies queued for it for one ``slow_client`` error
        per request. One that does not even read those is dropped."""
        reqs = self.requests.orphan_peer(peer)
        for req in reqs:
            self.abandon(req)
        if self.outboxes.was_replaced(peer):
            self.outboxes.drop(peer)
            log.warning("client %s read nothing since it was cut off; dropping its replies", peer.hex())
            return
        self.counters["slow_clients"] += 1
        log.warning("client %s is too slow: %s; cancelling its %d open request(s)", peer.hex(), why, len(reqs))
        text = f"{why}: the runtime cancelled your open requests and dropped the replies queued for you"
        ids = [req.client_id for req in reqs] or [None]
        self.outboxes.replace(peer, [protocol.encode(protocol.error_message("slow_client", text, i)) for i in ids])

    def _drop_peer(self, peer: bytes) -> None:
        self.outboxes.drop(peer)
        reqs = self.requests.orphan_peer(peer)
        for req in reqs:
            self.abandon(req)
        self.peer_gone(peer)
        if reqs:
            log.info("client %s is gone; cancelling its %d open request(s)", peer.hex(), len(reqs))
