"""Model configuration: the few numbers and named switches that describe every supported family.

One transformer runs Llama, Mistral, Qwen2.5, Qwen3, Gemma 2, Gemma 3, Phi-3.5 / Phi-4-mini and SmolLM3;
what differs between them is a switch here (bias, q/k norm, norms around the sub-layers, activation,
soft-caps, sliding-window layers, partial or absent RoPE), read by the loaders from a Hugging Face
``config.json`` (`gllm.loader.hf_config`) or from GGUF metadata (`gllm.loader.gguf_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a model, independent of where its weights come from; the defaults are Llama's."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Hugging Face style, with "rope_type" (gllm.model.rope.KINDS)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    family: str = "llama"  # the checkpoint's family (Hugging Face model_type), for messages
    qkv_bias: bool = False  # Qwen2: the Q, K and V projections add a bias
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each query and key head before RoPE
    norm_offset: float = 0.0  # Gemma: norms multiply by (offset + weight); loaders fold it into the weights
    sandwich_norms: bool = False  # Gemma 2 / 3: the attention and MLP outputs are normed too
    hidden_act: str = "silu"  # the MLP gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    embedding_multiplier: float = 1.0  # Gemma: sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is its -1/2 power (default head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: scores become cap * tanh(score / cap)
    final_logit_softcap: float | None = None  # Gemma 2: the same for the output logits
    sliding_window: int | None = None  # local layers attend to the last sliding_window positions only
    local_layers: tuple[int, ...] = ()  # which layers are local (all of them for Mistral 7B v0.1)
    local_rope_theta: float | None = None  # Gemma 3: local layers' RoPE base, unscaled (None: as global ones)
    rotary_dim: int | None = None  # Phi-4-mini: RoPE on the first rotary_dim dims of a head (None: all)
    nope_layers: tuple[int, ...] = ()  # SmolLM3: layers without RoPE
    fused_checkpoint: bool = False  # Phi-3: the checkpoint stores qkv_proj and gate_up_proj fused

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        rotary = self.rotary_dim if self.rotary_dim is not None else self.head_dim
        if self.head_dim % 2 or rotary % 2 or not 0 < rotary <= self.head_dim:
            raise ValueError(f"rotary_dim ({rotary}) and head_dim ({self.head_dim}) must be even, "
                             "and rotary_dim at most head_dim")
        if self.local_layers and not self.sliding_window:
            raise ValueError("local_layers need a sliding_window")
        for name in ("local_layers", "nope_layers"):
            if any(not 0 <= i < self.num_layers for i in getattr(self, name)):
                raise ValueError(f"{name} lists a layer outside 0..{self.num_layers - 1}")

    @property
    def attention_scale(self) -> float:
        """What query-key products are multiplied by before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None for a layer that attends to every position."""
        return self.sliding_window if layer in self.local_layers else None

    @property
    def all_local(self) -> bool:
        """Every layer attends within the window: cache blocks that leave it are needed by no layer."""
        return bool(self.sliding_window) and len(self.local_layers) == self.num_layers

    def layer_norms(self) -> list[str]:
        """The norm weights of one layer, by Hugging Face name below ``model.layers.N.``."""
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.qk_norm:
            norms += ["self_attn.q_norm", "self_attn.k_norm"]
        return norms

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dictionary of any supported family (`gllm.loader.hf_config`)."""
        from gllm.loader.hf_config import config_from_hf  # the loader reads configs; kept here for callers

        return config_from_hf(cfg)
