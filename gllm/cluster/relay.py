"""The front end's calls to the replicas: routing, streaming the replies back, failover.

It runs an asyncio loop on a thread of its own (Ray Serve's handles are asyncio objects), while the
ZeroMQ loop runs on the front end's thread. The front end hands it work (``open``, ``cancel``,
``abandon``, ``forward``); it hands back ``(key, peer, reply)`` events through ``deliver``, where a
``key`` is the request's and a ``None`` reply means the request is over without one (nobody reads it).

A request waits in the front end until the router finds it room on a replica. Its stream then relays
every reply batch as it comes. If the call fails because the replica is gone (Ray's ``RayActorError``:
the actor died or cannot be reached), the request is opened again on another replica with the tokens
already relayed (``resume``): greedy and seeded generations go on with exactly the tokens the lost
replica would have sent, and the client sees one stream. A request that cannot be placed again within
``FAILOVER_WAIT_S`` or that lost ``MAX_ATTEMPTS`` replicas ends with ``error{internal}``; so does one
whose replica raised (a bug, not a loss).
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
    """One open ``generate`` or ``score`` as the front end relays it."""

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
    task: asyncio.Task | None = None


class Relay:
    def __init__(self, handle: DeploymentHandle, router: Router, deliver: Deliver):
        self.handle = handle
        self._streaming = handle.options(stream=True)
        self.router = router
        self.deliver = deliver
        self.counters: collections.Counter[str] = collections.Counter()
        self._jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
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

    def forward(self, peer: bytes, client_id: ClientId | None, frame: bytes, affinity: ClientId | None,
                about: str | None) -> None:
        """Hand a message that opens no request to one replica and deliver its replies: the replica of the
        open request ``about`` names (the message's id is one), else the affinity's, else the least loaded."""
        self._loop.call_soon_threadsafe(self._spawn, self._forward(peer, client_id, frame, affinity, about))

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
                    job.task = self._spawn(self._run(job))
                elif job.lost_at is not None and now - job.lost_at > FAILOVER_WAIT_S:
                    self._end(job, protocol.error_message(
                        "internal", f"the replica running this request failed and none took it over within "
                                    f"{FAILOVER_WAIT_S:g} s", job.client_id))
                else:
                    still.append(job)
        self._waiting = still

    async def _refresh(self) -> None:
        while True:
            with self._lock:
                self.router.update(BOARD.snapshot())
            self._pump()
            await asyncio.sleep(REFRESH_S)

    async def _run(self, job: Job) -> None:
        replica = job.replica
        resume = job.tokens or None
        stream = self._streaming.stream.remote(job.peer, job.frame, resume, route=replica)
        try:
            async for item in stream:
                if isinstance(item, str):  # the replica's id: where the call landed
                    if item != replica:
                        with self._lock:
                            self.router.moved(replica, item, job.affinity, job.keys)
                        job.replica = replica = item
                    continue
                for msg in item:
                    self._relay(job, msg)
            if job.key in self._jobs:  # the stream ended without the request's last reply
                self._end(job, protocol.error_message("internal", "the replica's stream ended early", job.client_id))
        except asyncio.CancelledError:  # abandoned: the client is gone
            stream.cancel()
            raise
        except RayActorError as exc:
            self._lose(job, replica, exc)
        except Exception as exc:
            log.exception("request %s failed on replica %s", job.key, replica)
            self._end(job, protocol.error_message("internal", f"the replica failed on this request ({type(exc).__name__})",
                                                  job.client_id))
        finally:
            self._release(job)
            self._pump()

    def _relay(self, job: Job, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "token":
            job.tokens.append((msg["token_id"], msg["logprob"], msg["rank"]))
            job.text.append(msg["text"])
            job.first_token_at = job.first_token_at or time.monotonic()
        if kind in ("done", "scores", "error"):
            if kind != "error":
                msg["replica"] = job.replica  # where it ended: clients may ignore it
            if job.lost and isinstance(msg.get("timing"), dict):
                # Times from where the client's request arrived, not from the replica that took it over.
                msg["timing"] = {**msg["timing"], "ttft_ms": _ms(job.arrival, job.first_token_at),
                                 "total_ms": _ms(job.arrival, time.monotonic())}
            self._end(job, msg)
        else:
            self.deliver(job.key, job.peer, msg)

    def _lose(self, job: Job, replica: str, exc: Exception) -> None:
        """The replica under ``job`` is gone: open it again elsewhere, after the tokens already relayed."""
        log.warning("replica %s is gone (%s); request %s goes on elsewhere after %d token(s)", replica,
                    type(exc).__name__, job.key, len(job.tokens))
        with self._lock:
            self.router.fail(replica)
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
            self._spawn(self._call(job.replica, job.peer, frame))

    def _abandon(self, key: str) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if job in self._waiting:
            self._waiting.remove(job)
        elif job.task is not None:
            job.task.cancel()
        self._end(job, None)

    async def _forward(self, peer: bytes, client_id: ClientId | None, frame: bytes, affinity: ClientId | None,
                       about: str | None) -> None:
        job = self._jobs.get(about) if about else None
        with self._lock:
            replica = job.replica if job is not None and job.replica else self.router.target(affinity)
        if replica is None:
            self.deliver(None, peer, protocol.error_message("internal", "no replica is running", client_id))
            return
        for msg in await self._call(replica, peer, frame, client_id):
            self.deliver(None, peer, msg)

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


def _ms(start: float, t: float | None) -> float | None:
    return None if t is None else round((t - start) * 1000, 3)
