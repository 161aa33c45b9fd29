"""The asyncio face of the engine: futures, async token streams, and the task that drives steps."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING, AsyncIterator

from gllm.engine.params import GenerationRequest, GenerationResult, TokenDelta
from gllm.engine.saved_states import RestoreResult, SnapshotRequest, SnapshotResult
from gllm.engine.scoring import ScoreRequest, ScoreResult

if TYPE_CHECKING:
    from gllm.engine.llm_engine import StepOutput


class AsyncDriver:
    """Mixed into ``LLMEngine``: runs ``step`` on a worker thread while an event loop has requests waiting.

    The model step runs off the event loop so that a game's loop stays responsive; futures and stream
    queues are only touched from the loop's own thread.
    """

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gllm-step")
        self._futures: dict[str, asyncio.Future] = {}
        self._streams: dict[str, asyncio.Queue[TokenDelta | GenerationResult]] = {}
        self._driver: asyncio.Task[None] | None = None

    def enqueue_request(self, req: GenerationRequest) -> asyncio.Future[GenerationResult]:
        """Queue a request; the returned future resolves to its ``GenerationResult``."""
        return self._future_for(self.add_request(req))  # type: ignore[attr-defined]

    def enqueue_score(self, req: ScoreRequest) -> asyncio.Future[ScoreResult]:
        """Queue a score request; the returned future resolves to its ``ScoreResult``."""
        return self._future_for(self.add_score(req))  # type: ignore[attr-defined]

    def enqueue_snapshot(self, req: SnapshotRequest) -> asyncio.Future[SnapshotResult]:
        """Queue a snapshot; the future resolves to its ``SnapshotResult`` (``state`` holds the bytes)."""
        return self._future_for(self.add_snapshot(req))  # type: ignore[attr-defined]

    def enqueue_restore(self, state: bytes, pin: str | None = None) -> asyncio.Future[RestoreResult]:
        """Queue a restore; the future resolves to its ``RestoreResult``."""
        return self._future_for(self.add_restore(state, pin))  # type: ignore[attr-defined]

    def _future_for(self, request_id: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._futures[request_id] = future
        self._ensure_driver(loop)
        return future

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Yield each token as it is sampled; leaving the loop early aborts the request."""
        loop = asyncio.get_running_loop()
        request_id = self.add_request(req)  # type: ignore[attr-defined]
        queue: asyncio.Queue[TokenDelta | GenerationResult] = asyncio.Queue()
        self._streams[request_id] = queue
        self._ensure_driver(loop)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, GenerationResult):
                    del self._streams[request_id]
                    return
                yield item
        finally:
            if self._streams.pop(request_id, None) is not None:
                self.abort(request_id)  # type: ignore[attr-defined]

    def _ensure_driver(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while self.has_work():  # type: ignore[attr-defined]
            if (wait := self.wait_time()) > 0:  # type: ignore[attr-defined]  # paced requests not due yet
                await asyncio.sleep(min(wait, 0.01))
            try:
                out: StepOutput = await loop.run_in_executor(self._executor, self.step)  # type: ignore[attr-defined]
            except Exception as exc:  # a failed step fails the requests waiting on it, not the loop
                for fut in self._futures.values():
                    if not fut.done():
                        fut.set_exception(exc)
                self._futures.clear()
                raise
            for delta in out.deltas:
                queue = self._streams.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
            for result in out.finished:
                future = self._futures.pop(result.request_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
                queue = self._streams.get(result.request_id)
                if queue is not None:
                    queue.put_nowait(result)
