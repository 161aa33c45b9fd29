"""One engine behind the runtime's ``EngineService``, for callers on an asyncio loop (a replica's methods).

The engine steps on a thread of its own, as ``gllm serve``'s loop would: each turn it takes the commands
queued by the async side (open a request, handle a message, drop a request), runs one step, and hands the
turn's replies to the loop in one call. So the replica's event loop stays free to take calls while the
model runs, and the engine's state is touched by one thread only.

Replies leave through one channel, ``subscribe``: a stream that yields each turn's replies of every
request as one batch of (peer, reply) pairs. A stream per request would cost one message of Ray's
streaming per token; with one channel a step of 16 running requests is one message. The front end
subscribes once per replica; when its subscription ends (it stopped, or lost the replica), every open
request is dropped, since nobody would read its replies.

Each request is opened under a peer of its own (the front end's key for it), so its replies can never
be taken for another request's, even one that later reuses the same client id.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from gllm.engine import LLMEngine
from gllm.runtime import admission, protocol
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import ProtocolError
from gllm.runtime.service import EngineService

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1  # how long an idle engine thread blocks on its commands before it looks at the stop flag
Reply = dict[str, Any]
Batch = list[tuple[bytes, Reply]]


class ReplicaHost:
    def __init__(self, engine: LLMEngine, limits: ServerLimits):
        self.engine = engine
        self.limits = limits
        self.service = EngineService(engine, limits, self._collect)
        self.service.report_injected_ids = True  # the front end strips them (see ``Relay``)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._turn_replies: Batch = []
        self._captured: list[Reply] | None = None  # replies of the message ``call`` is handling
        self._subscriber: asyncio.Queue[Batch] | None = None  # touched on the loop's thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._stats = self.service.stats()
        self.failure: BaseException | None = None  # what ended the engine thread, if anything did
        self._thread = threading.Thread(target=self._run, name="gllm-replica-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(30)

    # -------------------------------------------------------------------------------------- async side
    async def subscribe(self) -> AsyncIterator[Batch]:
        """Every request's replies, a batch per engine turn, until the caller leaves; then every open
        request is dropped. A new subscription replaces the last one."""
        self._loop = asyncio.get_running_loop()
        batches: asyncio.Queue[Batch] = asyncio.Queue()
        self._subscriber = batches
        try:
            while True:
                batch = await batches.get()
                while not batches.empty():
                    batch += batches.get_nowait()
                yield batch
        finally:
            if self._subscriber is batches:
                self._subscriber = None
                self._commands.put(("drop_all", b""))

    def open(self, peer: bytes, frame: bytes, resume: list[tuple[int, float, int]] | None = None,
             injected: list[tuple[int, list[int]]] | None = None) -> None:
        """Open the request in ``frame`` (one of ``protocol.OPENING``) under ``peer``; its replies (or its
        error) come through ``subscribe``. ``resume``: tokens of this generation already streamed by another
        replica; ``injected``: the injections among them (``GenerationRequest.resume_injected``)."""
        self._commands.put(("open", peer, frame, resume, injected))

    def drop(self, peer: bytes) -> None:
        """End the requests opened under ``peer`` without a reply, and release the states pinned under it
        (their client is gone)."""
        self._commands.put(("drop", peer))

    async def call(self, peer: bytes, frame: bytes) -> list[Reply]:
        """Handle any other message (a ``cancel``, a type added later) and return the replies it made."""
        self._loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Reply]] = self._loop.create_future()
        self._commands.put(("call", peer, frame, done))
        return await done

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of the engine thread's last turn (it publishes a fresh copy each turn)."""
        return self._stats

    # ------------------------------------------------------------------------------------ engine side
    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._take_commands(block=not self.engine.has_work())
                    if self.engine.has_work():
                        self.service.step()
                finally:  # a failing engine's last replies (its requests' errors) still leave
                    self._hand_over()
                self._stats = self.service.stats()
        except BaseException as exc:  # the replica is broken: its health check reports it
            self.failure = exc
            log.exception("the engine thread stopped")
            raise

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._do(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _do(self, what: str, peer: bytes, *args: Any) -> None:
        if what == "open":
            self._open(peer, *args)
        elif what == "drop":
            for req in self.service.requests.orphan_peer(peer):
                self.service.cancel(req)
            self.service.forget(peer)
        elif what == "drop_all":
            for req in self.service.requests.orphan_all():
                self.service.cancel(req)
            self.service.forget_all()
        else:
            frame, done = args
            self._captured = []
            try:
                self._handle(peer, frame)
            finally:
                replies, self._captured = self._captured, None
                self._loop.call_soon_threadsafe(_resolve, done, replies)

    def _open(self, peer: bytes, frame: bytes, resume: list[tuple[int, float, int]] | None,
              injected: list[tuple[int, list[int]]] | None) -> None:
        request_id = None
        try:
            msg, req = admission.read_message(frame, self.limits)
            request_id = getattr(req, "id", None)
            if not isinstance(req, protocol.OPENING):
                raise ProtocolError("bad_request", f"a {msg['type']!r} message opens no request", request_id)
            admission.check_open(self.service.requests, peer, req.id, self.limits)
            if isinstance(req, protocol.Generate):
                self.service.submit(peer, req, resume, injected)
            else:
                self.service.submit(peer, req)
        except ProtocolError as exc:
            self._collect(peer, protocol.error_message(exc.code, exc.message, exc.request_id or request_id))
        except Exception as exc:  # a bug of ours: this request fails, the replica goes on
            log.exception("internal error while opening a request")
            self._collect(peer, protocol.error_message("internal", f"the replica failed on this request ({exc})",
                                                       request_id))

    def _handle(self, peer: bytes, frame: bytes) -> None:
        try:
            msg, req = admission.read_message(frame, self.limits)
            if isinstance(req, protocol.Cancel):
                open_req = self.service.requests.find(peer, req.id)
                if open_req is not None:
                    self.service.cancel(open_req)
            elif isinstance(req, protocol.Ping):
                self._collect(peer, protocol.pong_message(req.id))
            elif isinstance(req, (*protocol.OPENING, protocol.Info)):
                raise ProtocolError("bad_request", f"a {msg['type']!r} message is not relayed this way",
                                    getattr(req, "id", None))
            else:
                self.service.forward(peer, req)
        except ProtocolError as exc:
            self._collect(peer, protocol.error_message(exc.code, exc.message, exc.request_id))

    def _collect(self, peer: bytes, message: Reply) -> None:
        """The service's ``send``: replies wait for the end of the turn (or of the message being handled)."""
        if self._captured is not None:
            self._captured.append(message)
        else:
            self._turn_replies.append((peer, message))

    def _hand_over(self) -> None:
        if self._turn_replies and self._loop is not None and not self._loop.is_closed():
            replies, self._turn_replies = self._turn_replies, []
            self._loop.call_soon_threadsafe(self._deliver, replies)

    def _deliver(self, replies: Batch) -> None:
        """On the loop: the turn's replies to the subscriber (with none, nobody reads them)."""
        if self._subscriber is not None:
            self._subscriber.put_nowait(replies)


def _resolve(done: asyncio.Future, replies: list[Reply]) -> None:
    if not done.done():
        done.set_result(replies)
