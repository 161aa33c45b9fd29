"""Whole KV blocks copied out of the cache and back in: what a saved conversation carries.

The data of ``n`` blocks is one tensor ``[layers, 2, n, block_size, kv_heads, head_dim]`` on the CPU (keys
then values per layer, blocks in the order asked), so a snapshot is the same bytes whatever device the
cache lives on.
"""

from __future__ import annotations

import torch


def read_blocks(kv_caches: list[torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """A CPU copy of ``blocks`` from every layer's cache."""
    if not kv_caches:
        raise ValueError("there is no KV cache to read")
    index = torch.tensor(blocks, dtype=torch.int64, device=kv_caches[0].device)
    return torch.stack([kv.index_select(1, index) for kv in kv_caches]).cpu()


def write_blocks(kv_caches: list[torch.Tensor], blocks: list[int], data: torch.Tensor) -> None:
    """Store ``data`` (as ``read_blocks`` returns it) into ``blocks`` of every layer's cache."""
    expected = (len(kv_caches), 2, len(blocks), *kv_caches[0].shape[2:])
    if tuple(data.shape) != expected:
        raise ValueError(f"KV data has shape {tuple(data.shape)}, the cache needs {expected}")
    index = torch.tensor(blocks, dtype=torch.int64, device=kv_caches[0].device)
    for kv, layer in zip(kv_caches, data):
        kv.index_copy_(1, index, layer.to(device=kv.device, dtype=kv.dtype))
