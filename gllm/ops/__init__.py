"""Attention kernels over the paged KV cache, and the metadata that describes a packed batch."""

from gllm.ops.attention import context_attention, decode_attention, paged_attention, write_kv
from gllm.ops.metadata import AttentionMetadata
from gllm.ops.reference import reference_attention

__all__ = [
    "AttentionMetadata",
    "context_attention",
    "decode_attention",
    "paged_attention",
    "reference_attention",
    "write_kv",
]
