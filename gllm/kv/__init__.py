"""Paged KV cache: block pool (reference counts, free list, prefix cache), per-sequence block tables, memory,
pinned prefixes, and whole blocks copied out and in (saved conversations)."""

from gllm.kv.block_manager import BlockManager
from gllm.kv.block_pool import BlockKey, BlockPool, NoFreeBlocksError
from gllm.kv.cache import allocate_kv_cache, bytes_per_block
from gllm.kv.pins import PinLimitError, Pins
from gllm.kv.transfer import read_blocks, write_blocks

__all__ = ["BlockKey", "BlockManager", "BlockPool", "NoFreeBlocksError", "PinLimitError", "Pins", "allocate_kv_cache",
           "bytes_per_block", "read_blocks", "write_blocks"]
