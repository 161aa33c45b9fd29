"""The front end's calls to the replicas: routing, relaying the replies back, failover.

It runs an asyncio loop on a thread of its own (Ray Serve's handles are asyncio objects), while the
ZeroMQ loop runs on the front end's thread. The front end hands it work (``open``, ``cancel``,
``abandon``, ``forward``); it hands back ``(key, peer, reply)`` events through ``deliver``, where a
``key`` is the request's and a ``None`` reply means the request is over without one (nobody reads it).

Each replica has one reply channel (``EngineReplica.replies``), opened when Serve reports the replica
running: a stream of batches, one per engine turn, holding the replies of all its requests. Requests go
out as short ``open`` calls under their own key, and their replies come back through the channel. A
request waits in the front end until the router finds it room on a replica with an open channel.

When a channel fails (Ray's ``RayActorError``: the actor died or cannot be reached), the replica is
taken out of routing and each of its requests is opened again on another replica with the tokens
already relayed (``resume``): greedy and seeded generations go on with exactly the tokens the lost
replica would have sent, and the client sees one stream. A request that cannot be placed again within
``FAILOVER_WAIT_S``, or that lost ``MAX_ATTEMPTS`` replicas, ends with ``error{internal}``; so does one
whose ``open`` raised on the replica (a fault, not a loss). A ``snapshot`` or ``restore`` is opened again
the same way; a state pinned on a lost replica is gone with it.

A message about an open request (an ``inject``) goes to its replica under the request's key; one that
comes while the request still waits for a replica is held and sent after its ``open`` lands. A replica's
``token`` replies carry the ids of the injections that came right before them (``injected_ids``, which
the relay takes out): a request that fails over is opened again with them in their places among the
tokens relayed, and an injection sent that no token has followed yet is sent again after the new ``open``.

A replica holds a pinned state under the key of the ``restore`` that pinned it; ``unpin`` drops that key
there, which releases it.

Every replica serves the same LoRA adapters: those of ``--adapter`` from its start, and each
``load_adapter`` / ``unload_adapter`` is sent to all of them (``change_adapter``). A load that fails on
one is undone on the others, and the client gets that replica's error. The changes are kept, and a
replica that connects later (one Serve started in place of a lost one) makes them before it takes requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from gllm.cluster.prefix import PrefixKey
from gllm.cluster.board import BOARD
from gllm.cluster.router import Router
from gllm.runtime import protocol
from gllm.runtime.protocol import ClientId

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # replicas a request may lose before it fails
FAILOVER_WAIT_S = 60.0  # how long a request that lost its replica may wait for another
REFRESH_S = 0.25  # how often the router takes in Serve's view of the replicas
Deliver = Callable[[str | None, bytes, dict[str, Any] | None], None]


@dataclass(eq=False)
class Job:
    """One open request (``generate``, ``score``, ``snapshot``, ``restore``) as the front end relays it."""

    key: str
    peer: bytes
    client_id: ClientId
    frame: bytes
    affinity: ClientId | None
    keys: list[PrefixKey]
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[tuple[int, float, int]] = field(default_factory=list)  # relayed: (id, logprob, rank)
    text: list[str] = field(default_factory=list)  # the relayed tokens' texts
    first_token_at: float | None = None
    replica: str | None = None
    holds: bool = False  # counted as open on ``replica`` by the router
    lost: list[str] = field(default_factory=list)  # replicas that died under it
    lost_at: float | None = None
    cancelled: bool = False
    opened: bool = False  # the ``open`` has landed on ``replica``
    held: list[tuple[bytes, ClientId | None, bytes]] = field(default_factory=list)  # messages about it, for then
    injects: list[tuple[bytes, ClientId | None, bytes]] = field(default_factory=list)  # sent, not yet followed by a token
    injected: list[tuple[int, list[int]]] = field(default_factory=list)  # (index of the token after, ids)


class Relay:
    def __init__(self, handle: DeploymentHandle, router: Router, deliver: Deliver):
        self.handle = handle
        self._streaming = handle.options(stream=True)
        self.router = router
        self.deliver = deliver
        self.counters: collections.Counter[str] = collections.Counter()
        self._jobs: dict[str, Job] = {}  # by key, which is also the peer a replica knows the request by
        self._channels: dict[str, asyncio.Task] = {}  # each replica's reply stream
        self._connected: set[str] = set()  # replicas whose reply stream is open: requests may go there
        self._waiting: collections.deque[Job] = collections.deque()
        self._pinned: dict[str, str] = {}  # key of a restore that pinned a state -> the replica holding it
        self._adapter_changes: dict[str, str | None] = {}  # adapter name -> path loaded at run time, or None: unloaded
        self._lock = threading.Lock()  # the router, as ``view`` reads it from the front end's thread
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gllm-relay", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._refresh(), self._loop)

    # --------------------------------------------------------------------------- the front end's side
    def open(self, job: Job) -> None:
        self._loop.call_soon_threadsafe(self._open, job)

    def cancel(self, key: str) -> None:
        self._loop.call_soon_threadsafe(self._cancel, key)

    def abandon(self, key: str) -> None:
        self._loop.call_soon_threadsafe(self._abandon, key)

    def unpin(self, key: str) -> None:
        """Release the state that the restore ``key`` pinned (nothing if its replica is gone)."""
        self._loop.call_soon_threadsafe(self._unpin, key)

    def forward(self, peer: bytes, client_id: ClientId | None, frame: bytes, affinity: ClientId | None,
                about: str | None) -> None:
        """Hand a message that opens no request to one replica and deliver its replies: the replica of the
        open request ``about`` names (the message's id is one), else the affinity's, else the least loaded."""
        self._loop.call_soon_threadsafe(self._spawn, self._forward(peer, client_id, frame, affinity, about))

    def change_adapter(self, peer: bytes, req: protocol.LoadAdapter | protocol.UnloadAdapter, frame: bytes) -> None:
        """Load or unload an adapter on every replica and deliver one reply: ``adapters``, or the first error."""
        self._loop.call_soon_threadsafe(self._spawn, self._change_adapter(peer, req, frame))

    def describe(self, timeout_s: float) -> dict[str, Any]:
        """The model as a replica describes it; waits for the first replica to be up."""
        async def ask() -> dict[str, Any]:
            return await self.handle.describe.remote()

        return asyncio.run_coroutine_threadsafe(ask(), self._loop).result(timeout_s)

    def view(self) -> list[dict[str, Any]]:
        """Each replica's health, the requests open on it here, and the statistics it last reported."""
        board = BOARD.snapshot()
        with self._lock:
            rows = self.router.view()
        for row in rows:
            stats = board.get(row["id"], {})
            row.update({k: stats[k] for k in REPLICA_STATS if k in stats})
        return rows

    def totals(self) -> dict[str, int]:
        """The replicas' engine counters summed, for ``info``'s ``stats``."""
        total: collections.Counter[str] = collections.Counter()
        for stats in BOARD.snapshot().values():
            total.update({k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)})
        return dict(total)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel every call still running (their replicas drop the requests), then end the loop."""
        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(finish(), self._loop).result(timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------------------------- the loop's
    def _spawn(self, coro: Any) -> asyncio.Task:
        return self._loop.create_task(coro)

    def _open(self, job: Job) -> None:
        self._jobs[job.key] = job
        self._waiting.append(job)
        self._pump()

    def _pump(self) -> None:
        """Start every waiting request the router finds room for, oldest first."""
        still = collections.deque()
        now = time.monotonic()
        with self._lock:
            while self._waiting:
                job = self._waiting.popleft()
                replica = self.router.route(job.affinity, job.keys, exclude=job.lost)
                if replica is not None:
                    job.replica, job.holds = replica, True
                    self._spawn(self._start(job))
                elif job.lost_at is not None and now - job.lost_at > FAILOVER_WAIT_S:
                    self._end(job, protocol.error_message(
                        "internal", f"the replica running this request failed and none took it over within "
                                    f"{FAILOVER_WAIT_S:g} s", job.client_id))
                else:
                    still.append(job)
        self._waiting = still

    async def _refresh(self) -> None:
        """Follow Serve's replica set: subscribe to each new replica; route only to subscribed ones."""
        while True:
            for replica in BOARD.snapshot():
                if replica not in self._channels and not self.router.failed(replica):
                    self._channels[replica] = self._spawn(self._channel(replica))
            with self._lock:
                self.router.update([r for r in BOARD.snapshot() if r in self._connected])
            self._pump()
            await asyncio.sleep(REFRESH_S)

    async def _channel(self, replica: str) -> None:
        """Relay every reply of ``replica`` until it is gone; then its requests go on elsewhere."""
        stream = self._streaming.replies.remote(route=replica)
        try:
            async for item in stream:
                if isinstance(item, str):  # the replica's id: it serves this channel, or it is another one
                    if item != replica:
                        return  # the replica meant was gone; the next refresh tries again if it is listed
                    await self._replay_adapters(replica)
                    self._connected.add(replica)
                    continue
                for peer, msg in item:
                    job = self._jobs.get(peer.decode())
                    if job is not None:
                        self._relay(job, msg)
            self._lost(replica, "its reply stream ended")
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # RayActorError: the actor died or cannot be reached
            self._lost(replica, f"{type(exc).__name__}: {exc}"[:200])
        finally:
            self._channels.pop(replica, None)
            self._connected.discard(replica)

    async def _start(self, job: Job) -> None:
        """Open ``job`` on the replica the router chose, after any tokens relayed already."""
        planned = job.replica
        try:
            landed = await self.handle.open.remote(job.key.encode(), job.frame, job.tokens or None,
                                                   job.injected or None, route=planned)
        except RayActorError as exc:
            self._lose(job, planned, f"{type(exc).__name__}")
            return
        except Exception as exc:
            log.exception("opening request %s on replica %s failed", job.key, planned)
            self._end(job, protocol.error_message("internal", f"the replica failed on this request "
                                                              f"({type(exc).__name__})", job.client_id))
            return
        if landed != planned:  # the planned replica was gone when the call left
            self._spawn(self._drop(landed, job.key))
            self._lose(job, planned, "it was gone when the request was sent")
            return
        job.opened = True
        for peer, client_id, frame in job.held:  # messages that came while it waited (an ``inject``)
            self._spawn(self._forward(peer, client_id, frame, None, job.key))
        job.held.clear()

    def _lost(self, replica: str, why: str) -> None:
        """``replica`` is gone: route nothing more there, and move its requests."""
        with self._lock:
            self.router.fail(replica)
        self._pinned = {key: r for key, r in self._pinned.items() if r != replica}
        for job in [j for j in self._jobs.values() if j.replica == replica and j not in self._waiting]:
            self._lose(job, replica, why)
        self._pump()

    def _relay(self, job: Job, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "token":
            if injected := msg.pop("injected_ids", None):
                del job.injects[: len(injected)]  # injections apply in the order they were sent
                job.injected.append((len(job.tokens), [t for ids in injected for t in ids]))
            job.tokens.append((msg["token_id"], msg["logprob"], msg["rank"]))
            job.text.append(msg["text"])
            job.first_token_at = job.first_token_at or time.monotonic()
        if kind == "restored" and msg["pinned"]:
            self._pinned[job.key] = job.replica
        if kind in protocol.FINAL_REPLIES:
            if kind in ("done", "scores"):
                msg["replica"] = job.replica  # where it ended: clients may ignore it
            if job.lost and isinstance(msg.get("timing"), dict):
                # Times from where the client's request arrived, not from the replica that took it over.
                msg["timing"] = {**msg["timing"], "ttft_ms": _ms(job.arrival, job.first_token_at),
                                 "total_ms": _ms(job.arrival, time.monotonic())}
            self._end(job, msg)
        else:
            self.deliver(job.key, job.peer, msg)

    def _lose(self, job: Job, replica: str, why: str) -> None:
        """The replica under ``job`` is gone: open it again elsewhere, after the tokens already relayed."""
        if job.key not in self._jobs or job.replica != replica or job in self._waiting:
            return  # over, or moved already
        log.warning("replica %s is gone (%s); request %s goes on elsewhere after %d token(s)", replica, why,
                    job.key, len(job.tokens))
        self._release(job)
        job.opened = False
        job.held[:0], job.injects = job.injects, []  # no token followed them there: sent again after the open
        self.counters["failovers"] += 1
        job.lost.append(replica)
        job.lost_at = time.monotonic()
        if job.cancelled:
            self._end(job, _cancelled(job))
        elif len(job.lost) >= MAX_ATTEMPTS:
            self._end(job, protocol.error_message(
                "internal", f"{len(job.lost)} replicas failed while running this request", job.client_id))
        else:
            self._waiting.append(job)

    def _release(self, job: Job) -> None:
        if job.holds:
            job.holds = False
            with self._lock:
                self.router.release(job.replica)

    def _end(self, job: Job, msg: dict[str, Any] | None) -> None:
        """The request is over: its replica's room is freed before its last reply leaves."""
        self._release(job)
        if self._jobs.pop(job.key, None) is not None:
            self.deliver(job.key, job.peer, msg)

    def _cancel(self, key: str) -> None:
        job = self._jobs.get(key)
        if job is None or job.cancelled:
            return
        job.cancelled = True
        if job in self._waiting:
            self._waiting.remove(job)
            self._end(job, _cancelled(job))
        else:  # the replica ends it with done{cancelled}, after the tokens already on their way
            frame = protocol.encode({"type": "cancel", "id": job.client_id})
            self._spawn(self._call(job.replica, job.key.encode(), frame))

    def _abandon(self, key: str) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if job in self._waiting:
            self._waiting.remove(job)
        else:
            self._spawn(self._drop(job.replica, key))
        self._end(job, None)

    def _unpin(self, key: str) -> None:
        replica = self._pinned.pop(key, None)
        if replica is not None:
            self._spawn(self._drop(replica, key))

    async def _drop(self, replica: str, key: str) -> None:
        try:
            await self.handle.drop.remote(key.encode(), route=replica)
        except Exception as exc:  # a replica that is gone has dropped it already
            log.info("dropping request %s on replica %s: %s", key, replica, exc)

    async def _forward(self, peer: bytes, client_id: ClientId | None, frame: bytes, affinity: ClientId | None,
                       about: str | None) -> None:
        job = self._jobs.get(about) if about else None
        if job is not None and not job.opened:  # still waiting for a replica: sent when it is opened there
            job.held.append((peer, client_id, frame))
            return
        if job is not None:  # about an open request: its replica, under its own peer
            replica, peer_there = job.replica, job.key.encode()
            inject = (peer, client_id, frame) if _is_inject(frame) else None
            if inject:
                job.injects.append(inject)
        else:
            with self._lock:
                replica = self.router.target(affinity)
            peer_there = peer
        if replica is None:
            self.deliver(None, peer, protocol.error_message("internal", "no replica is running", client_id))
            return
        replies = await self._call(replica, peer_there, frame, client_id)
        if job is not None and inject and inject in job.injects and any(m["type"] == "error" for m in replies):
            job.injects.remove(inject)  # refused there: it never lands, and is not sent again
        for msg in replies:
            self.deliver(None, peer, msg)

    async def _change_adapter(self, peer: bytes, req: protocol.LoadAdapter | protocol.UnloadAdapter,
                              frame: bytes) -> None:
        replicas = sorted(self._connected)
        if not replicas:
            self.deliver(None, peer, protocol.error_message("internal", "no replica is running", req.id))
            return
        answers = await asyncio.gather(*(self._call(r, peer, frame, req.id) for r in replicas))
        firsts = [a[0] if a else protocol.error_message("internal", "the replica did not answer", req.id)
                  for a in answers]
        failed = [m for m in firsts if m["type"] != "adapters"]
        if failed and isinstance(req, protocol.LoadAdapter):  # undone where it loaded: all serve the same
            undo = protocol.encode({"type": "unload_adapter", "name": req.name})
            await asyncio.gather(*(self._call(r, peer, undo) for r, m in zip(replicas, firsts)
                                   if m["type"] == "adapters"))
        elif not failed:
            self._adapter_changes[req.name] = req.path if isinstance(req, protocol.LoadAdapter) else None
        self.deliver(None, peer, failed[0] if failed else firsts[0])

    async def _replay_adapters(self, replica: str) -> None:
        """Make a replica that connects now serve the adapters the others serve (see the module docstring)."""
        for name, path in self._adapter_changes.items():
            await self._call(replica, b"adapters", protocol.encode({"type": "unload_adapter", "name": name}))
            if path is not None:
                answer = await self._call(replica, b"adapters", protocol.encode(
                    {"type": "load_adapter", "name": name, "path": path}))
                if not answer or answer[0]["type"] != "adapters":
                    log.warning("replica %s could not load adapter %r: %s", replica, name, answer)

    async def _call(self, replica: str, peer: bytes, frame: bytes,
                    client_id: ClientId | None = None) -> list[dict[str, Any]]:
        try:
            return await self.handle.call.remote(peer, frame, route=replica)
        except Exception as exc:
            log.warning("a message to replica %s failed: %s", replica, exc)
            return [protocol.error_message("internal", f"the replica failed on this message ({type(exc).__name__})",
                                           client_id)]


# The statistics of each replica that ``info`` lists beside its health.
REPLICA_STATS = ("running", "waiting", "kv_blocks_total", "kv_blocks_in_use", "kv_blocks_cached",
                 "generated_tokens", "finished_requests", "prompt_tokens", "cached_prompt_tokens")


def _cancelled(job: Job) -> dict[str, Any]:
    """``done{cancelled}`` for a request that no replica holds (not started yet, or its replica died)."""
    text = "".join(job.text)
    usage = {"prompt_tokens": 0, "completion_tokens": len(job.tokens), "cached_tokens": 0}
    timing = {"queued_ms": None, "ttft_ms": _ms(job.arrival, job.first_token_at),
              "total_ms": _ms(job.arrival, time.monotonic())}
    return protocol.done_message(job.client_id, "cancelled", text, usage, timing)


def _is_inject(frame: bytes) -> bool:
    try:
        return protocol.decode(frame).get("type") == "inject"
    except Exception:  # the replica answers a bad frame with its own error
        return False


def _ms(start: float, t: float | None) -> float | None:
    return None if t is None else round((t - start) * 1000, 3)
