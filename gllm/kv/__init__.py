"""Paged KV cache: block pool (reference counts, free list, prefix cache), per-sequence block tables, memory."""

from gllm.kv.block_manager import BlockManager
from gllm.kv.block_pool import BlockKey, BlockPool, NoFreeBlocksError
from gllm.kv.cache import allocate_kv_cache, bytes_per_block

__all__ = ["BlockKey", "BlockManager", "BlockPool", "NoFreeBlocksError", "allocate_kv_cache", "bytes_per_block"]
