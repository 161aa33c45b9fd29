"""Rotary position embeddings: the frequencies of every scaling the supported families use, and their tables.

Scalings (``rope_scaling["rope_type"]``, Hugging Face's names): ``default``, ``linear``, ``llama3``, ``yarn``
(Ministral 3), ``longrope`` (Phi-3.5 / Phi-4-mini) and ``freq_factors`` (a GGUF file's ``rope_freqs``
tensor: llama.cpp's precomputed ``llama3`` divisors). YaRN and LongRoPE also scale cos and sin by an
attention factor.

Every table rotates the two halves of the first ``rotary_dim`` dimensions of a head (Hugging Face's
"rotate half" layout). A head rotated only in part (Phi-4-mini: 96 of 128) or not at all (SmolLM3's
layers without RoPE) gets ``cos = 1, sin = 0`` for the rest: the kernels rotate whole heads, and those
pairs come out unchanged. For that the model stores such heads' dimensions in the order of
:func:`rotary_row_order`, so that the pairs ``(i, i + rotary_dim / 2)`` the checkpoint rotates become the
pairs ``(i, i + head_dim / 2)`` the kernels rotate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

KINDS = ("default", "linear", "llama3", "yarn", "longrope", "freq_factors")


def rope_frequencies(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim / 2]`` (float32, on the CPU) and the factor cos and sin are scaled by.

    ``max_positions`` is the longest sequence the engine runs: LongRoPE takes its long factors when it
    exceeds the original context, as llama.cpp does with its context size (Hugging Face instead switches
    every position's frequencies once a sequence grows past it, which would change keys already cached).
    Computed on the CPU whatever the default device (on the meta device torch would route these ops
    through Python references that import ``torch._dynamo``).
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    s = scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, s), 1.0
    if kind == "freq_factors":
        return inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device="cpu"), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, rotary_dim, theta, s)
    if kind == "longrope":
        return _longrope(exponents, theta, s, max_positions)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: {', '.join(KINDS)})")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by ``factor``, keep high ones, blend smoothly in between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by ``factor``, keep the high ones, ramp linearly in between
    (the ramp's ends are where a frequency turns ``beta_fast`` and ``beta_slow`` times over the original
    context); cos and sin grow by ``0.1 ln(factor) + 1`` unless the checkpoint says otherwise."""
    factor, original = s["factor"], s["original_max_position_embeddings"]
    attention = s.get("attention_factor")
    if attention is None:
        mscale, all_dims = s.get("mscale"), s.get("mscale_all_dim")
        both = mscale and all_dims
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dims) if both else _yarn_mscale(factor)

    def dimension(rotations: float) -> float:  # the dimension whose frequency turns this often over the context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(s.get("beta_fast") or 32), dimension(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # the share of the original frequency
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def _longrope(
    exponents: torch.Tensor, theta: float, s: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    """LongRoPE: each frequency divided by its own factor, short or long (see ``rope_frequencies``)."""
    original = s["original_max_position_embeddings"]
    factors = s["long_factor"] if max_positions > original else s["short_factor"]
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * theta**exponents)
    attention = s.get("attention_factor")
    if attention is None:
        factor = s.get("factor") or 1.0
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, float(attention)


def rotary_row_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Where each stored dimension of a partly rotated head comes from: its rotated halves first within
    each half of the head, so that the kernels' pairs ``(i, i + head_dim / 2)`` are the checkpoint's
    ``(i, i + rotary_dim / 2)`` and the pass-through dimensions pair among themselves."""
    r, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = [*range(r), *range(rotary_dim, rotary_dim + p)]
    second = [*range(r, rotary_dim), *range(rotary_dim + p, head_dim)]
    return torch.tensor(first + second, device="cpu")


def query_scales(scaling: dict[str, Any] | None, max_positions: int) -> torch.Tensor | None:
    """Per-position query multipliers ``1 + beta ln(1 + floor(p / original))`` (Ministral 3's
    ``llama_4_scaling_beta``), or None where every position would get 1."""
    beta = (scaling or {}).get("llama_4_scaling_beta")
    original = (scaling or {}).get("original_max_position_embeddings")
    if not beta or not original or max_positions <= original:
        return None
    positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
    return 1 + beta * torch.log1p(torch.floor(positions / original))


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables ``[P, head_dim / 2]`` for one kind of layer (see the module docstring).

    ``rotary_dim`` 0 makes a table that rotates nothing (cos 1, sin 0), for layers without RoPE.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        rotary_dim: int | None = None,
    ):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        cos = torch.ones(max_positions, head_dim // 2, device="cpu")
        sin = torch.zeros(max_positions, head_dim // 2, device="cpu")
        if rotary_dim:
            inv_freq, factor = rope_frequencies(rotary_dim, theta, scaling, max_positions)
            freqs = torch.arange(max_positions, dtype=torch.float32, device="cpu").unsqueeze(1) * inv_freq.unsqueeze(0)
            cos[:, : rotary_dim // 2] = freqs.cos() * factor
            sin[:, : rotary_dim // 2] = freqs.sin() * factor
        self.register_buffer("cos", cos, persistent=False)  # [P, D/2]
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, 1, D/2]`` for ``positions [T]``, looked up once per step and shared by the layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, heads, D]`` by the angles of ``positions [T]``."""
        return apply_rope(x, *self.tables(positions, x.dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, D]`` by precomputed ``cos`` / ``sin`` tables (``RotaryEmbedding.tables``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
