"""Pinned blocks: cached prefixes that stay in the KV cache, whatever the pressure, until released.

A game keeps its main characters' conversations warm this way: a pin holds one reference to each of its
blocks, so the pool never hands them out (held blocks are not free) and every request with that prefix
finds them. Pins are named by their owner; the blocks they hold together are bounded, since every pinned
block is memory the running requests cannot use.
"""

from __future__ import annotations

import collections

from gllm.kv.block_pool import BlockPool


class PinLimitError(ValueError):
    """Pinning these blocks would hold more distinct blocks than the limit allows."""


class Pins:
    def __init__(self, pool: BlockPool, max_blocks: int):
        self.pool = pool
        self.max_blocks = max_blocks
        self._pins: dict[str, list[int]] = {}
        self._holders: collections.Counter[int] = collections.Counter()  # block -> pins holding it

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held by pins."""
        return len(self._holders)

    def __len__(self) -> int:
        return len(self._pins)

    def __contains__(self, name: str) -> bool:
        return name in self._pins

    def check(self, blocks: list[int], extra: int = 0) -> None:
        """Raise ``PinLimitError`` when pinning ``blocks`` and ``extra`` blocks not allocated yet would go
        over the limit."""
        total = self.num_blocks + len({b for b in blocks if b not in self._holders}) + extra
        if total > self.max_blocks:
            raise PinLimitError(f"pinning {len(blocks) + extra} more blocks would hold {total} blocks pinned; "
                                f"the limit is {self.max_blocks} blocks")

    def pin(self, name: str, blocks: list[int]) -> None:
        """Keep ``blocks``, whose references the caller hands over, under ``name`` (a new name)."""
        if name in self._pins:
            raise ValueError(f"{name!r} already pins blocks; release it first")
        self.check(blocks)
        self._pins[name] = list(blocks)
        self._holders.update(blocks)

    def release(self, name: str) -> int:
        """Drop a pin's references (its blocks stay cached, evictable again); unknown names do nothing.
        Returns how many blocks it held."""
        blocks = self._pins.pop(name, [])
        for block in reversed(blocks):
            self._holders[block] -= 1
            if not self._holders[block]:
                del self._holders[block]
            self.pool.free(block)
        return len(blocks)
