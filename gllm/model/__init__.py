"""The Llama network (from scratch) and its rotary embeddings."""

from gllm.model.llama import LlamaModel
from gllm.model.rope import RotaryEmbedding, rope_inv_freq

__all__ = ["LlamaModel", "RotaryEmbedding", "rope_inv_freq"]
