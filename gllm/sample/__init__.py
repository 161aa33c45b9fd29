"""Sampling: per-row temperature, top-k and top-p, seeded draws, token bitmasks, and raw logprobs for each
chosen token."""

from gllm.sample.bitmask import TokenBitmask
from gllm.sample.filters import apply_top_k, apply_top_p
from gllm.sample.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "TokenBitmask", "apply_top_k", "apply_top_p"]
