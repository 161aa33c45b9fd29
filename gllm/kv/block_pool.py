"""BlockPool: reference-counted KV cache blocks with an O(1) free list and an LRU prefix cache.

A block is *in use* while its reference count is above zero. A block whose count drops to zero goes to
the free list; if it holds a full block of known tokens (it has a hash) it stays findable by that hash
until its memory is needed again, and the free list hands out the least recently freed blocks first.
Blocks without a hash go to the front of the free list, so cached blocks are evicted only when no plain
free block is left.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    """The pool has no free block left; the scheduler preempts a request and tries again."""


@dataclass(frozen=True)
class BlockKey:
    """What a cached block holds: the hash of its parent block and its own tokens (verified on a hit)."""

    parent_hash: int | None
    token_ids: tuple[int, ...]

    @property
    def hash(self) -> int:
        return hash((self.parent_hash, self.token_ids))


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block (got {num_blocks})")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.cache_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (including cached blocks nobody holds)."""
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self) -> int:
        """Take a free block (evicting its cached content, if any) with one reference."""
        if not self._free:
            raise NoFreeBlocksError("no free KV cache block")
        block, _ = self._free.popitem(last=False)
        key = self.keys[block]
        if key is not None:
            del self._cached[key.hash]
            self.keys[block] = None
            self.cache_evictions += 1
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Add a holder to a block; a free cached block comes back into use."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        """Drop one holder; at zero the block goes to the free list (kept cached if it has a hash)."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} freed more often than it was held")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None
            if self.keys[block] is None:
                self._free.move_to_end(block, last=False)

    def lookup(self, key: BlockKey) -> int | None:
        """The cached block holding exactly ``key``, if any."""
        block = self._cached.get(key.hash)
        if block is None or self.keys[block] != key:
            return None
        return block

    def register(self, block: int, key: BlockKey) -> None:
        """Mark a full, computed block as holding ``key`` so later requests can share it."""
        if self.keys[block] is not None or key.hash in self._cached:
            return  # already cached, or another block holds the same tokens
        self.keys[block] = key
        self._cached[key.hash] = block

    def clear_cache(self) -> None:
        """Forget every cached block that nobody holds (e.g. when prefix caching is switched off)."""
        for block in list(self._free):
            key = self.keys[block]
            if key is not None:
                del self._cached[key.hash]
                self.keys[block] = None
