"""What one ``gllm serve`` process accepts: message size, open requests per client, shutdown grace.

Kept apart from the server so that ``gllm --help`` can show the defaults without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    max_message_bytes: int = 1 << 20  # larger messages get a too_long error ...
    max_open_requests: int = 64  # per client connection; beyond it: overloaded
    shutdown_grace_s: float = 5.0  # in-flight requests may finish within this after SIGTERM

    @property
    def hard_message_bytes(self) -> int:
        """... and beyond this (libzmq's MAXMSGSIZE) libzmq drops the connection, as no reply can be read first."""
        return 4 * self.max_message_bytes
