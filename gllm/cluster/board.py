"""What the front end's process knows of the replicas: Serve's running set and each one's reported statistics.

Written by ``PinnedRequestRouter`` (which Ray Serve builds inside the front end's deployment handle, on
its own event loop thread) and read by the relay and ``info``. It lives in a module of its own because Serve
ships the request router's module by value; the router imports this one when it runs, and so reaches the
process's own board.
"""

from __future__ import annotations

import threading
from typing import Any


class ReplicaBoard:
    """The running replicas by id, each with its last reported statistics; read and written across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[str, dict[str, Any]] = {}

    def publish(self, replicas: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self._replicas = replicas

    def remove(self, replica: str) -> None:
        with self._lock:
            self._replicas = {r: s for r, s in self._replicas.items() if r != replica}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._replicas)


BOARD = ReplicaBoard()  # one front end per process
