"""Prefix keys: what the front end remembers of the prompts it sent to each replica, without a tokenizer.

A replica's prefix cache holds the KV blocks of the prompts it computed, so a new request runs cheapest
where the longest start of its prompt went before. The front end does not tokenize (it loads no model, and
a replica's chat template may depend on request fields it does not read), so it cuts the prompt as sent
into units and chains their hashes, each key standing for the prompt up to the end of its unit:

* ``messages``: for each message its role, then its content in pieces of ``CHUNK_CHARS`` characters (the
  last piece shorter). Shared lore at the start of a system message yields the same leading keys for
  every NPC, and a conversation that grows by a turn keeps all of its earlier keys;
* ``prompt``: pieces of ``CHUNK_CHARS`` characters;
* ``prompt_token_ids``: blocks of ``CHUNK_TOKENS`` ids, the engine's default block size.

Each key comes with its unit's weight (characters or tokens), so a match is measured by how much of the
prompt it covers. The hashes are Python's own: they are compared only within one front-end process.
"""

from __future__ import annotations

from typing import Any

CHUNK_CHARS = 64  # roughly one 16-token KV block of English text
CHUNK_TOKENS = 16

PrefixKey = tuple[int, int]  # (chained hash, weight of the unit it ends)


def prefix_keys(msg: dict[str, Any]) -> list[PrefixKey]:
    """The chained keys of a request's prompt, in order; empty when it has none."""
    units: list[tuple[Any, int]] = []  # (unit, weight)
    if msg.get("messages"):
        for m in msg["messages"]:
            units.append((("role", m.get("role", "")), 1))
            units += [(p, len(p)) for p in _pieces(m.get("content", ""), CHUNK_CHARS)]
    elif msg.get("prompt"):
        units = [(p, len(p)) for p in _pieces(msg["prompt"], CHUNK_CHARS)]
    elif msg.get("prompt_token_ids"):
        units = [(tuple(b), len(b)) for b in _pieces(msg["prompt_token_ids"], CHUNK_TOKENS)]
    keys, parent = [], 0
    for unit, weight in units:
        parent = hash((parent, unit))
        keys.append((parent, weight))
    return keys


def _pieces(seq: Any, size: int) -> list[Any]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]
