"""Which replica serves a request: affinity first, then the longest cached prefix, then the least loaded.

* **Affinity.** A request with an ``affinity`` key (an NPC's id, say) goes to the replica that key went to
  before, for as long as that replica is healthy: a conversation stays where its KV blocks are. When that
  replica is full the request waits for room there rather than moving. A new key, or one whose replica
  died, is placed by the rules below and then stays.
* **Cached prefix.** Otherwise the front end looks at what it sent where (``prefix``): the replica holding
  the longest start of this prompt gets it, among the replicas that are not much busier than the least
  loaded one (at most ``max_imbalance`` more open requests). Without that bound every NPC sharing the same
  world lore would pile onto one replica.
* **Least loaded.** Otherwise, or when nothing matches, the replica with the fewest open requests; ties
  take turns.

Load is what the front end itself has open on each replica, and no replica gets more than ``capacity``
at once: enough for a running batch and the next one waiting in the engine. A request that finds no room
waits in the front end (``route`` returns None). ``policy="round-robin"`` ignores keys and prefixes and
deals requests out in turn (the benchmark's baseline).

This module knows nothing of Ray: the front end feeds it the healthy replicas (``update``) and the
failures it sees (``fail``), and the tests drive it directly.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

from gllm.cluster.prefix import PrefixKey

POLICIES = ("affinity", "round-robin")


class Router:
    def __init__(self, capacity: int, max_imbalance: int, policy: str = "affinity", max_keys: int = 200_000,
                 max_affinities: int = 1_000_000):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.capacity = capacity
        self.max_imbalance = max_imbalance
        self.policy = policy
        self.max_keys = max_keys  # prefix keys remembered per replica, least recently used dropped first
        self.max_affinities = max_affinities
        self._healthy: list[str] = []
        self._dead: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._load: dict[str, int] = {}
        self._affinity: collections.OrderedDict[tuple[type, Any], str] = collections.OrderedDict()
        self._prefixes: dict[str, collections.OrderedDict[int, None]] = {}
        self._turn = 0

    # ------------------------------------------------------------------------------------ replica set
    def update(self, replicas: Iterable[str]) -> None:
        """The replicas the cluster reports running; those seen failing stay out."""
        self._healthy = [r for r in replicas if r not in self._dead]
        for r in self._healthy:
            self._load.setdefault(r, 0)
            self._prefixes.setdefault(r, collections.OrderedDict())
        for r in list(self._prefixes):
            if r not in self._healthy:
                del self._prefixes[r]  # its cache is gone with it

    def fail(self, replica: str) -> None:
        """A call to ``replica`` failed because it is gone: route nothing more there."""
        self._dead[replica] = None
        while len(self._dead) > 64:
            self._dead.popitem(last=False)
        self.update(list(self._healthy))

    def failed(self, replica: str) -> bool:
        return replica in self._dead

    @property
    def healthy(self) -> list[str]:
        return list(self._healthy)

    def load(self, replica: str) -> int:
        return self._load.get(replica, 0)

    def view(self) -> list[dict[str, Any]]:
        """Every replica known, healthy ones first, with the requests the front end has open on it."""
        rows = [{"id": r, "healthy": True, "open_requests": self.load(r)} for r in self._healthy]
        return rows + [{"id": r, "healthy": False, "open_requests": self.load(r)} for r in self._dead]

    # ---------------------------------------------------------------------------------------- routing
    def route(self, affinity: Any, keys: Sequence[PrefixKey], exclude: Iterable[str] = ()) -> str | None:
        """The replica for a new request, counted as open there; None while none has room."""
        replica = self._choose(affinity, keys, set(exclude))
        if replica is not None:
            self._place(replica, affinity, keys)
        return replica

    def target(self, affinity: Any) -> str | None:
        """The replica for a message that opens no request: its affinity's (pinned if new), else the least
        loaded; None when no replica is healthy."""
        pinned = self._pinned(affinity)
        if pinned is not None:
            return pinned
        if not self._healthy:
            return None
        replica = min(self._rotation(), key=self.load)
        if affinity is not None:
            self._pin(affinity, replica)
        return replica

    def release(self, replica: str) -> None:
        """A request open on ``replica`` has ended."""
        if self._load.get(replica, 0) > 0:
            self._load[replica] -= 1

    def matched(self, replica: str, keys: Sequence[PrefixKey]) -> int:
        """How much of the prompt (characters or tokens) ``replica`` was sent before, from its start."""
        seen = self._prefixes.get(replica, {})
        total = 0
        for key, weight in keys:
            if key not in seen:
                break
            total += weight
        return total

    def _choose(self, affinity: Any, keys: Sequence[PrefixKey], exclude: set[str]) -> str | None:
        open_ = [r for r in self._rotation() if r not in exclude and self.load(r) < self.capacity]
        if self.policy == "round-robin":
            return open_[0] if open_ else None
        pinned = self._pinned(affinity)
        if pinned is not None and pinned not in exclude:
            return pinned if self.load(pinned) < self.capacity else None  # wait for room where its cache is
        if not open_:
            return None
        least = min(self.load(r) for r in open_)
        near = [r for r in open_ if self.load(r) <= least + self.max_imbalance]
        best = max(near, key=lambda r: (self.matched(r, keys), -self.load(r)))
        if self.matched(best, keys) > 0:
            return best
        return min(open_, key=self.load)

    def _rotation(self) -> list[str]:
        """The healthy replicas, starting one further each call: equal choices take turns."""
        n = len(self._healthy)
        if not n:
            return []
        self._turn = (self._turn + 1) % n
        return self._healthy[self._turn :] + self._healthy[: self._turn]

    def _place(self, replica: str, affinity: Any, keys: Sequence[PrefixKey]) -> None:
        self._load[replica] = self._load.get(replica, 0) + 1
        if self.policy == "round-robin":
            return
        if affinity is not None:
            self._pin(affinity, replica)
        seen = self._prefixes.get(replica)
        if seen is None:
            return
        for key, _ in keys:
            seen[key] = None
            seen.move_to_end(key)
        while len(seen) > self.max_keys:
            seen.popitem(last=False)

    def _pinned(self, affinity: Any) -> str | None:
        if affinity is None:
            return None
        replica = self._affinity.get(_key(affinity))
        return replica if replica in self._healthy else None

    def _pin(self, affinity: Any, replica: str) -> None:
        key = _key(affinity)
        self._affinity[key] = replica
        self._affinity.move_to_end(key)
        while len(self._affinity) > self.max_affinities:
            self._affinity.popitem(last=False)


def _key(affinity: Any) -> tuple[type, Any]:
    """Keeps the integer 1 and the string "1" apart, as for request ids."""
    return (type(affinity), affinity)
