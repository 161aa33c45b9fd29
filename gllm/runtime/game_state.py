"""The runtime's side of game state: saved states (snapshot, restore, pins by client) and events mid-line.

The engine does the work (``gllm.engine.game_state``); this module maps what the wire names to it. A client
names its pinned state by the id of the restore that pinned it, releases it by that id, and a client that
disconnects keeps nothing pinned. An ``inject`` names a generation of the same client.
"""

from __future__ import annotations

import itertools

from gllm.engine import LLMEngine, RestoreResult, SnapshotRequest
from gllm.runtime import admission, protocol
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import ClientId, ProtocolError
from gllm.runtime.requests import OpenRequest, OpenRequests, id_key


class ClientPins:
    """Each client's pinned states: its ids for them (those of the restores that pinned) to the engine's
    pin names, which are unique across clients."""

    def __init__(self) -> None:
        self._by_peer: dict[bytes, dict[tuple[type, ClientId], str]] = {}
        self._serial = itertools.count()

    def name(self, peer: bytes) -> str:
        """A fresh engine pin name for ``peer``."""
        return f"{peer.hex()}/pin-{next(self._serial)}"

    def has(self, peer: bytes, client_id: ClientId) -> bool:
        return id_key(client_id) in self._by_peer.get(peer, {})

    def add(self, peer: bytes, client_id: ClientId, name: str) -> None:
        self._by_peer.setdefault(peer, {})[id_key(client_id)] = name

    def pop(self, peer: bytes, client_id: ClientId) -> str | None:
        mine = self._by_peer.get(peer, {})
        name = mine.pop(id_key(client_id), None)
        if not mine:
            self._by_peer.pop(peer, None)
        return name

    def pop_peer(self, peer: bytes) -> list[str]:
        """Every pin of a client that is gone."""
        return list(self._by_peer.pop(peer, {}).values())

    def pop_all(self) -> list[str]:
        """Every pin of every client (the caller that held them for all clients is gone)."""
        names = [name for mine in self._by_peer.values() for name in mine.values()]
        self._by_peer.clear()
        return names


class GameStateRequests:
    """Snapshots, restores, releases and injections of the runtime's clients."""

    def __init__(self, engine: LLMEngine, requests: OpenRequests, limits: ServerLimits):
        self.engine = engine
        self.requests = requests
        self.limits = limits
        self.pins = ClientPins()

    def inject(self, peer: bytes, req: protocol.Inject) -> None:
        """Into one of the client's generations; unknown or finished ids are fine, like a cancel. A bad
        injection gets an error with a nil id: the generation it names goes on."""
        open_req = self.requests.find(peer, req.id)
        if open_req is not None and open_req.kind == "generate":
            try:
                self.engine.inject(open_req.engine_id, req.text, req.token_ids)
            except ValueError as exc:
                raise ProtocolError("bad_request", f"inject for id {req.id!r}: {exc}") from None

    def release(self, peer: bytes, req: protocol.Release) -> None:
        if (name := self.pins.pop(peer, req.id)) is not None:
            self.engine.release(name)

    def snapshot(self, open_req: OpenRequest, snap: SnapshotRequest) -> None:
        """Queue a snapshot of a tokenized prompt whose state fits ``max_state_bytes``."""
        whole_blocks = len(snap.prompt_token_ids) // self.engine.block_manager.block_size
        admission.check_state(self.engine.states.format.bytes_for(whole_blocks), self.limits, open_req.client_id)
        self.engine.add_snapshot(snap)

    def restore(self, open_req: OpenRequest, req: protocol.Restore) -> None:
        """Check a saved state and queue it; pinned, it is kept under the client's id until ``release``."""
        if req.pin and self.pins.has(open_req.peer, req.id):
            raise ProtocolError("bad_request", f"id {req.id!r} already pins a state: release it first", req.id)
        open_req.pin = self.pins.name(open_req.peer) if req.pin else None
        self.engine.add_restore(req.state, open_req.pin, open_req.engine_id)

    def restored(self, req: OpenRequest, result: RestoreResult) -> None:
        """Keep a new pin under the client's id, or release it at once if the client is gone."""
        if result.pinned and req.orphaned:
            self.engine.release(req.pin)
        elif result.pinned:
            self.pins.add(req.peer, req.client_id, req.pin)

    def forget(self, peer: bytes) -> None:
        """A client that is gone keeps nothing pinned."""
        for name in self.pins.pop_peer(peer):
            self.engine.release(name)

    def forget_all(self) -> None:
        for name in self.pins.pop_all():
            self.engine.release(name)
