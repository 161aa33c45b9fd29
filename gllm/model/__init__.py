"""The decoder every supported family runs on (from scratch) and its rotary embeddings."""

from gllm.model.llama import LlamaModel
from gllm.model.rope import RotaryEmbedding, rope_frequencies

__all__ = ["LlamaModel", "RotaryEmbedding", "rope_frequencies"]
