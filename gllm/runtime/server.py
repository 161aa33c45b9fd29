"""``gllm serve`` on one process: the protocol endpoint (``endpoint``) in front of one engine (``service``).

Each turn of the loop takes every message that has arrived, runs one engine step, and sends what the step
produced; while the engine is idle the loop blocks on the socket. The engine never waits on a client.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import zmq

from gllm.engine import LLMEngine
from gllm.runtime import admission, protocol
from gllm.runtime.access import CurveServer
from gllm.runtime.endpoint import Endpoint
from gllm.runtime.limits import ServerLimits
from gllm.runtime.requests import OpenRequest
from gllm.runtime.service import EngineService

log = logging.getLogger(__name__)


class Server(Endpoint):
    """Serves one engine on one endpoint until ``stop`` is called (see ``Endpoint`` for the shutdown)."""

    def __init__(self, engine: LLMEngine, endpoint: str, limits: ServerLimits = ServerLimits(),
                 context: zmq.Context | None = None, curve: CurveServer | None = None):
        super().__init__(endpoint, limits, context, curve)
        self.engine = engine
        self.service = EngineService(engine, limits, self.send, self.requests)

    def run(self) -> None:
        log.info("serving %s on %s (protocol v%d, max_seq_len %d, %d KV blocks)", self.engine.model_name,
                 self.endpoint, protocol.PROTOCOL_VERSION, self.engine.max_seq_len,
                 self.engine.block_manager.pool.num_blocks)
        super().run()

    def busy(self) -> bool:
        return self.engine.has_work()

    def work(self) -> None:
        if self.engine.has_work():
            self.service.step()

    def submit(self, peer: bytes, req: protocol.Generate | protocol.Score | protocol.Snapshot | protocol.Restore,
               msg: dict[str, Any]) -> None:
        self.service.submit(peer, req)

    def cancel(self, req: OpenRequest) -> None:
        self.service.cancel(req)

    def abandon(self, req: OpenRequest) -> None:
        self.service.cancel(req)

    def forward(self, peer: bytes, req: protocol.Request, msg: dict[str, Any]) -> None:
        self.service.forward(peer, req)

    def peer_gone(self, peer: bytes) -> None:
        self.service.forget(peer)

    def info(self, request_id: protocol.ClientId | None) -> dict[str, Any]:
        stats = {**self.service.stats(), **self.client_stats(), "gc_frozen_objects": gc.get_freeze_count()}
        model = self.service.model_info()
        return protocol.info_message(request_id, model["model"], model["vocab_size"], model["max_seq_len"], stats,
                                     admission.reported(self.limits), model["adapters"])
