"""The engine replica: a Ray Serve deployment, one ``LLMEngine`` per replica, serving the front end's calls.

A replica runs the same request handling as ``gllm serve`` (``ReplicaHost`` over the runtime's
``EngineService``); the front end hands it protocol messages as they came from the client and relays its
replies. Serve's controller calls ``check_health`` and replaces a replica whose engine thread has stopped,
and polls ``record_routing_stats`` for the load that ``info`` reports.

The front end subscribes to ``replies`` once, then opens requests with ``open`` (each under a peer of
its own) and reaches them with ``call`` and ``drop``. Every method takes a ``route`` keyword: the replica
the front end chose, read by ``PinnedRequestRouter`` in the front end's process before the call is sent;
the replica itself ignores it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from gllm.runtime.limits import ServerLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica builds: the engine (as ``gllm serve``'s options say) and the limits it checks."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    quantize: str | None = None
    threads: int = 1
    max_batch_size: int = 8
    max_seq_len: int = 2048
    kv_blocks: int | None = None
    kv_memory: int | None = None
    max_pinned_memory: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    adapters: tuple[tuple[str, str], ...] = ()  # LoRA adapters (name, path) every replica loads at start


@serve.deployment
class EngineReplica:
    def __init__(self, config: ReplicaConfig):
        import torch

        from gllm.cluster.host import ReplicaHost
        from gllm.constrain import GrammarLimits
        from gllm.engine import GeneratorParams, LLMEngine

        torch.set_num_threads(config.threads)
        params = GeneratorParams(max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len,
                                 num_kv_blocks=config.kv_blocks, kv_memory=config.kv_memory,
                                 max_pinned_memory=config.max_pinned_memory)
        grammar_limits = GrammarLimits(config.limits.max_grammar_size, config.limits.grammar_fuel)
        engine = LLMEngine(config.model, params, device=config.device, dtype=config.dtype, quantize=config.quantize,
                           grammar_limits=grammar_limits, adapters=dict(config.adapters))
        engine.constraints.warm_up()  # structured output's tokenizer, built while the replica starts
        gc.collect()
        gc.freeze()  # as gllm serve does: start-up objects out of the collector's walks
        self.host = ReplicaHost(engine, config.limits)
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        log.info("replica %s serving %s", self.replica_id, engine.model_name)

    async def replies(self, route: str | None = None) -> AsyncIterator[str | list[tuple[bytes, dict[str, Any]]]]:
        """First this replica's id, then every request's replies, a batch per engine turn (``subscribe``).
        Only the id when the call was meant for another replica (it was gone when the call left)."""
        yield self.replica_id
        if route is not None and route != self.replica_id:
            return
        async for batch in self.host.subscribe():
            yield batch

    def open(self, peer: bytes, frame: bytes, resume: list[tuple[int, float, int]] | None = None,
             injected: list[tuple[int, list[int]]] | None = None, route: str | None = None) -> str:
        """Open a request (its replies come through ``replies``); returns where it landed."""
        self.host.open(peer, frame, resume, injected)
        return self.replica_id

    def drop(self, peer: bytes, route: str | None = None) -> None:
        self.host.drop(peer)

    async def call(self, peer: bytes, frame: bytes, route: str | None = None) -> list[dict[str, Any]]:
        return await self.host.call(peer, frame)

    def describe(self, route: str | None = None) -> dict[str, Any]:
        return {"replica": self.replica_id, **self.host.service.model_info()}

    def record_routing_stats(self) -> dict[str, Any]:
        return self.host.stats()

    def check_health(self) -> None:
        if not self.host.alive:
            raise RuntimeError(f"the engine thread of replica {self.replica_id} stopped: {self.host.failure!r}")

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.stop()
