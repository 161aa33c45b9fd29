"""Records when each token leaves the engine, in whatever process serves it (``gllm serve`` or a replica).

``install()`` wraps ``EngineService``: every token's (request id, index) is stamped with
``time.perf_counter()`` (``CLOCK_MONOTONIC``, the same clock in every process of a Linux machine) as the
engine hands it out, and each step's stamps are appended to ``$GLLM_TOKEN_TRACE/<pid>.jsonl``.
``cluster_bench.py`` installs it in a single ``gllm serve`` by running it through this module, and in
the replicas as Ray's ``worker_process_setup_hook``; the client's receive times minus these are the
latency added between the engine and the game.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def install() -> None:
    folder = os.environ.get("GLLM_TOKEN_TRACE")
    if not folder:
        return
    from gllm.runtime.service import EngineService

    path = Path(folder) / f"{os.getpid()}.jsonl"
    on_token, step = EngineService._on_token, EngineService.step
    stamps: list[list] = []

    def traced_on_token(self, delta):
        req = self.requests.get(delta.request_id)
        if req is not None:
            stamps.append([req.client_id, delta.index, time.perf_counter()])
        on_token(self, delta)

    def traced_step(self):
        step(self)
        if stamps:
            with open(path, "a") as f:
                f.write(json.dumps(stamps) + "\n")
            stamps.clear()

    EngineService._on_token = traced_on_token
    EngineService.step = traced_step


def read(folder: Path) -> dict[tuple, float]:
    """Every stamp in ``folder``: (request id, index) -> when the engine handed the token out."""
    out = {}
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            for request_id, index, t in json.loads(line):
                out[(request_id, index)] = t
    return out


if __name__ == "__main__":  # python cluster_trace.py serve ...: gllm's command line, traced
    install()
    from gllm.cli import main

    sys.exit(main(sys.argv[1:]))
