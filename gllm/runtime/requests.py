"""Which client owns which engine request: the runtime's map between wire ids and engine ids.

Clients choose their own ids (unique only among *their* open requests), while the engine needs ids unique
across everyone. So each accepted request gets a fresh engine id, and this registry maps both ways:
``(peer, client id) -> request`` to route ``cancel`` and to refuse a duplicate id, and
``engine id -> request`` to route the engine's tokens and results back to the peer that asked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gllm.runtime.protocol import ClientId


@dataclass
class OpenRequest:
    peer: bytes  # ZeroMQ routing id of the client's connection
    client_id: ClientId
    engine_id: str
    kind: str  # "generate", "score", "snapshot" or "restore"
    top_n: int = 0  # alternatives per token the client asked for
    orphaned: bool = False  # the client is gone (or was dropped): the engine's output is discarded
    dropped_turns: int | None = None  # chat turns left out (a generate with context_overflow "drop_oldest")
    pin: str | None = None  # the engine's name for the pin a restore asked for


class OpenRequests:
    """Open requests by engine id and by (peer, client id)."""

    def __init__(self) -> None:
        self._by_engine: dict[str, OpenRequest] = {}
        self._by_peer: dict[bytes, dict[ClientId, OpenRequest]] = {}
        self._serial = itertools.count()

    @property
    def num_open(self) -> int:
        """Requests whose client is still there (orphaned ones may still be winding down in the engine)."""
        return sum(len(mine) for mine in self._by_peer.values())

    @property
    def num_peers(self) -> int:
        """Clients with at least one open request."""
        return len(self._by_peer)

    def count(self, peer: bytes) -> int:
        return len(self._by_peer.get(peer, ()))

    def find(self, peer: bytes, client_id: ClientId) -> OpenRequest | None:
        return self._by_peer.get(peer, {}).get(id_key(client_id))

    def get(self, engine_id: str) -> OpenRequest | None:
        return self._by_engine.get(engine_id)

    def new(self, peer: bytes, client_id: ClientId, kind: str, top_n: int = 0) -> OpenRequest:
        """A request with a fresh engine id; not registered until ``add`` (the engine may still refuse it)."""
        return OpenRequest(peer, client_id, f"{peer.hex()}-{next(self._serial)}", kind, top_n)

    def add(self, req: OpenRequest) -> None:
        self._by_engine[req.engine_id] = req
        self._by_peer.setdefault(req.peer, {})[id_key(req.client_id)] = req

    def close(self, engine_id: str) -> OpenRequest | None:
        """Forget a request whose result is out (or will never be sent); returns it."""
        req = self._by_engine.pop(engine_id, None)
        if req is not None and not req.orphaned:
            self._detach(req)
        return req

    def orphan_peer(self, peer: bytes) -> list[OpenRequest]:
        """Mark every open request of ``peer`` orphaned and free its client ids; returns them."""
        reqs = list(self._by_peer.pop(peer, {}).values())
        for req in reqs:
            req.orphaned = True
        return reqs

    def orphan_all(self) -> list[OpenRequest]:
        """Orphan every open request (shutdown); returns those that were not orphaned yet."""
        return [req for peer in list(self._by_peer) for req in self.orphan_peer(peer)]

    def _detach(self, req: OpenRequest) -> None:
        mine = self._by_peer.get(req.peer)
        if mine is not None:
            mine.pop(id_key(req.client_id), None)
            if not mine:
                del self._by_peer[req.peer]


def id_key(client_id: ClientId) -> tuple[type, ClientId]:
    """Keeps the integer 1 and the string "1" apart as ids."""
    return (type(client_id), client_id)
