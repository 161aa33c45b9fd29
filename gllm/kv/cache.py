"""The KV cache memory: one preallocated tensor per layer, ``[2, num_blocks, block_size, kv_heads, head_dim]``."""

from __future__ import annotations

import math

import numpy as np
import torch

from gllm.config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Memory of one block across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """Zeroed tensors. On the CPU they come from ``calloc`` (numpy's zeros), whose large allocations are
    fresh pages the OS zeroes when first touched: the cache costs neither time at start-up nor resident
    memory until blocks are written (``torch.zeros`` writes every byte at once)."""
    shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return [torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape) for _ in range(cfg.num_layers)]
