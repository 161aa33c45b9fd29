"""The cluster's ZeroMQ front end: protocol v1 to the game clients, engine replicas behind it.

Clients see one ``gllm serve``: the same socket, admission, limits, outboxes for slow readers, disconnect
handling and shutdown (all ``Endpoint``'s). What each message does:

* ``ping`` and ``info`` are answered here; ``info`` adds the replicas, their health and load;
* ``generate``, ``score``, ``snapshot`` and ``restore`` open a request that the ``Relay`` routes to a
  replica (``Router``: affinity, cached prefix, least loaded) and whose replies it streams back in order.
  A restored state lands in the prefix cache of the replica that took the ``restore``: the ``affinity``
  key of the requests meant to find it takes it there;
* ``cancel``, and any other message whose ``id`` names one of the client's open requests (``inject``),
  goes to the replica running that request;
* ``release`` goes to the replica holding the state that the restore of that id pinned; a client that
  disconnects has its pins released there too;
* ``load_adapter`` and ``unload_adapter`` go to every replica (and to replicas that start later), so that
  a request naming an adapter finds it wherever it is routed; ``info`` lists the adapters they reported;
* any other message type goes to one replica, the one of its ``affinity`` key if it has one (so state a
  replica keeps for a key is found again under that key), else the least loaded; its replies come back.

Replies come from the relay's thread through ``deliver``: a queue, and one byte on an inproc socket that
wakes this loop when the queue was empty.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import zmq

from gllm.cluster.prefix import prefix_keys
from gllm.cluster.relay import Job, Relay
from gllm.runtime import admission, protocol
from gllm.runtime.access import CurveServer
from gllm.runtime.endpoint import Endpoint
from gllm.runtime.game_state import ClientPins
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import ProtocolError
from gllm.runtime.requests import OpenRequest

log = logging.getLogger(__name__)

Event = tuple[str | None, bytes, dict[str, Any] | None]


class FrontEnd(Endpoint):
    def __init__(self, endpoint: str, limits: ServerLimits = ServerLimits(), curve: CurveServer | None = None):
        super().__init__(endpoint, limits, curve=curve)
        self.relay: Relay | None = None
        self.model: dict[str, Any] = {}
        self.pins = ClientPins()  # each client's pinned states, by restore id: the key of that restore
        self._events: collections.deque[Event] = collections.deque()
        self._events_lock = threading.Lock()
        self._signalled = False
        context = self.socket.context
        address = f"inproc://gllm-relay-{id(self)}"
        self._wake_in = context.socket(zmq.PAIR)
        self._wake_in.bind(address)
        self._wake_out = context.socket(zmq.PAIR)  # written on the relay's thread only
        self._wake_out.connect(address)
        self.poll_also(self._wake_in)

    def attach(self, relay: Relay, model: dict[str, Any]) -> None:
        """The relay to the replicas, and the model they serve (as ``info`` reports it)."""
        self.relay, self.model = relay, model

    def deliver(self, key: str | None, peer: bytes, msg: dict[str, Any] | None) -> None:
        """Called on the relay's thread: a reply for ``peer`` (``key``: of that open request; a None reply,
        or a last one, closes it)."""
        with self._events_lock:
            self._events.append((key, peer, msg))
            wake, self._signalled = not self._signalled, True
        if wake:
            self._wake_out.send(b"", zmq.NOBLOCK)

    def run(self) -> None:
        log.info("front end for %s on %s (protocol v%d)", self.model.get("model"), self.endpoint,
                 protocol.PROTOCOL_VERSION)
        super().run()

    def close(self) -> None:
        self._wake_out.close(linger=0)
        self._wake_in.close(linger=0)
        super().close()

    # ------------------------------------------------------------------------------------------ work
    def work(self) -> None:
        while True:
            try:
                self._wake_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._events_lock:
            events, self._events = self._events, collections.deque()
            self._signalled = False
        for key, peer, msg in events:
            req = self.requests.get(key) if key is not None else None
            if msg is None or (req is not None and msg["type"] in protocol.FINAL_REPLIES):
                self.requests.close(key)
            if req is not None and msg is not None and msg["type"] == "restored" and msg["pinned"]:
                if req.orphaned:
                    self.relay.unpin(key)
                else:
                    self.pins.add(peer, req.client_id, key)
            if msg is not None and msg["type"] == "adapters":
                self.model["adapters"] = msg["adapters"]
            if msg is not None and (req is None or not req.orphaned):
                self.send(peer, msg)

    def submit(self, peer: bytes, req: protocol.Generate | protocol.Score | protocol.Snapshot | protocol.Restore,
               msg: dict[str, Any]) -> None:
        if isinstance(req, protocol.Restore) and req.pin and self.pins.has(peer, req.id):
            raise ProtocolError("bad_request", f"id {req.id!r} already pins a state: release it first", req.id)
        open_req = self.requests.new(peer, req.id, msg["type"])
        self.requests.add(open_req)
        self.relay.open(Job(open_req.engine_id, peer, req.id, protocol.encode(msg), protocol.affinity_of(msg),
                            prefix_keys(msg)))

    def cancel(self, req: OpenRequest) -> None:
        self.relay.cancel(req.engine_id)

    def abandon(self, req: OpenRequest) -> None:
        self.relay.abandon(req.engine_id)

    def forward(self, peer: bytes, req: protocol.Request, msg: dict[str, Any]) -> None:
        if isinstance(req, protocol.Release):  # unknown ids are fine, as on one process
            if (key := self.pins.pop(peer, req.id)) is not None:
                self.relay.unpin(key)
            return
        if isinstance(req, (protocol.LoadAdapter, protocol.UnloadAdapter)):
            self.relay.change_adapter(peer, req, protocol.encode(msg))
            return
        client_id = getattr(req, "id", None)
        about = self.requests.find(peer, client_id) if client_id is not None else None
        self.relay.forward(peer, client_id, protocol.encode(msg), protocol.affinity_of(msg),
                           about.engine_id if about else None)

    def peer_gone(self, peer: bytes) -> None:
        for key in self.pins.pop_peer(peer):
            self.relay.unpin(key)

    def info(self, request_id: protocol.ClientId | None) -> dict[str, Any]:
        replicas = self.relay.view()
        stats = {**dict.fromkeys(protocol.INFO_STATS, 0), **self.relay.totals(), **self.client_stats(),
                 "replicas_healthy": sum(r["healthy"] for r in replicas),
                 "failovers": self.relay.counters["failovers"]}
        msg = protocol.info_message(request_id, self.model["model"], self.model["vocab_size"],
                                    self.model["max_seq_len"], stats, admission.reported(self.limits),
                                    self.model.get("adapters", []))
        msg["replicas"] = replicas
        return msg
