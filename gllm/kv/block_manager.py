"""BlockManager: gives each sequence the cache blocks it needs, shares cached prefixes, frees in reverse.

A sequence owns a *block table* (list of block ids): token ``i`` of the sequence lives in block
``table[i // block_size]`` at offset ``i % block_size``. Full blocks whose tokens are all computed get a
chained hash (``hash(parent_hash, token_ids)``) and enter the prefix cache, so a later sequence starting
with the same tokens takes them instead of recomputing them.

With a ``window`` (a model whose every layer attends to its last ``window`` positions only, as Mistral
7B v0.1), blocks that have fallen wholly behind the window of a sequence's next position are needed by no
layer: ``release_passed`` gives them back to the pool (where a full block stays in the prefix cache until
its memory is reused), and the table keeps the scratch block's id in their place, so that positions still
index it and a gather of the whole table reads a real block. In a model with any global layer a block
holds that layer's keys too, so nothing is released (the one-pool design: a block is every layer's).
"""

from __future__ import annotations

from collections.abc import Callable

from gllm.kv.block_pool import BlockKey, BlockPool


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int | None = None):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.released = num_blocks  # the id a released block leaves in a table: the cache's scratch block

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def peak_blocks(self, num_tokens: int, chunk: int) -> int:
        """The most blocks a sequence of ``num_tokens`` holds at once, computed in chunks of up to ``chunk``
        tokens: all of them, or with a window the blocks from the window's start to the chunk's end."""
        whole = self.blocks_needed(num_tokens)
        return whole if self.window is None else min(whole, (self.window - 1 + chunk) // self.block_size + 2)

    def match_prefix(self, token_ids: list[int], salt: int | None = None) -> tuple[list[int], list[BlockKey]]:
        """Take (reference) the cached blocks of the longest cached prefix of ``token_ids``.

        The match covers at most ``len(token_ids) - 1`` tokens, so the last token is always computed and
        yields logits. Returns the blocks and their keys; the caller owns one reference to each block.
        ``salt`` starts the hash chain: blocks committed under another salt (K/V computed another way) never
        match.
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        keys: list[BlockKey] = []
        parent = salt
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            key = BlockKey(parent, tuple(token_ids[start : start + self.block_size]))
            block = self.pool.lookup(key)
            if block is None:
                break
            self.pool.incref(block)
            blocks.append(block)
            keys.append(key)
            parent = key.hash
        return blocks, keys

    def _shared_tail(self, block_table: list[int], num_computed: int) -> bool:
        """Whether the next write lands in a partly filled block that someone else also holds."""
        return bool(num_computed % self.block_size) and self.pool.ref_counts[block_table[num_computed // self.block_size]] > 1

    def growth(self, block_table: list[int], num_tokens: int, num_computed: int = 0) -> int:
        """How many free blocks ``grow`` would take to hold ``num_tokens`` tokens, a copy-on-write included."""
        extra = self._shared_tail(block_table, num_computed)
        return max(0, self.blocks_needed(num_tokens) - len(block_table)) + extra

    def can_grow(self, block_table: list[int], num_tokens: int, num_computed: int = 0) -> bool:
        """Whether enough blocks are free to hold ``num_tokens`` tokens, a copy-on-write included."""
        return self.growth(block_table, num_tokens, num_computed) <= self.pool.num_free

    def grow(self, block_table: list[int], num_tokens: int, num_computed: int = 0) -> list[tuple[int, int]]:
        """Make the table hold ``num_tokens`` tokens (check ``can_grow`` first).

        A partly filled block that is shared (a fork) is copied before it is written: the copy replaces it
        in this table. Returns the ``(src, dst)`` block copies the caller must perform on the cache.
        """
        copies = []
        if self._shared_tail(block_table, num_computed):
            i = num_computed // self.block_size
            copy = self.pool.allocate()
            copies.append((block_table[i], copy))
            self.pool.free(block_table[i])
            block_table[i] = copy
        while len(block_table) * self.block_size < num_tokens:
            block_table.append(self.pool.allocate())
        return copies

    def share(self, block_table: list[int], into: list[int]) -> None:
        """Give ``into`` (empty) the same blocks as ``block_table``, one more reference each."""
        for block in block_table:
            if block != self.released:
                self.pool.incref(block)
        into[:] = block_table

    def commit(self, block_table: list[int], keys: list[BlockKey], token_ids: list[int], num_computed: int,
               salt: int | None = None) -> None:
        """Hash and cache every block that is now full of computed tokens (``keys`` grows in place)."""
        if not self.enable_prefix_caching:
            return
        while (len(keys) + 1) * self.block_size <= num_computed:
            i = len(keys)
            parent = keys[-1].hash if keys else salt
            key = BlockKey(parent, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size]))
            self.pool.register(block_table[i], key)
            keys.append(key)

    def release_passed(self, block_table: list[int], num_computed: int) -> None:
        """Give back the blocks the next position's window no longer reaches (only with a ``window``).

        The next position ``p = num_computed`` sees ``p - window < k <= p``: block ``i`` is passed when
        ``(i + 1) * block_size <= p - window + 1``. Call after ``commit``, so that full blocks stay cached.
        """
        if self.window is None:
            return
        for i in range(max(0, (num_computed - self.window + 1) // self.block_size)):
            if block_table[i] != self.released:
                self.pool.free(block_table[i])
                block_table[i] = self.released

    def cached_prefix(self, token_ids: list[int], salt: int | None = None) -> list[int]:
        """The cached blocks of the longest cached run of ``token_ids``' full blocks (hash chain from
        ``salt``), taking no reference: read them before anything allocates a block."""
        blocks: list[int] = []
        parent = salt
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            key = BlockKey(parent, tuple(token_ids[start : start + self.block_size]))
            block = self.pool.lookup(key)
            if block is None:
                break
            blocks.append(block)
            parent = key.hash
        return blocks

    def hold_prefix(self, token_ids: list[int], fill: Callable[[list[int], list[int]], None],
                    salt: int | None = None) -> list[int]:
        """One reference to a cached block for each full block of ``token_ids`` (hash chain from ``salt``), in order.

        A block the prefix cache already holds is shared; the others take free blocks, which
        ``fill(indexes, blocks)`` writes (block ``indexes[i]`` of the tokens into ``blocks[i]``) before they
        enter the cache. Stops at the first block for which no block is free. The caller frees the
        returned blocks (they stay cached) or keeps them (pinned).
        """
        held: list[int] = []
        fresh: list[tuple[int, int, BlockKey]] = []
        parent = salt
        for i, start in enumerate(range(0, len(token_ids) - self.block_size + 1, self.block_size)):
            key = BlockKey(parent, tuple(token_ids[start : start + self.block_size]))
            parent = key.hash
            block = self.pool.lookup(key)
            if block is not None:
                self.pool.incref(block)
            elif self.pool.num_free:
                block = self.pool.allocate()
                fresh.append((i, block, key))
            else:
                break
            held.append(block)
        if fresh:
            fill([i for i, _, _ in fresh], [b for _, b, _ in fresh])
            for _, block, key in fresh:
                self.pool.register(block, key)
        return held

    def free(self, block_table: list[int]) -> None:
        """Release a sequence's blocks, last first, so that a prefix's tail is evicted before its head."""
        for block in reversed(block_table):
            if block != self.released:
                self.pool.free(block)
        block_table.clear()
