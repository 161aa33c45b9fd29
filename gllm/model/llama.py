"""The Llama network, from scratch: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU, output head.

It works on packed batches: ``T`` new tokens of many sequences in one flat tensor, their positions, and an
``AttentionMetadata`` that says where each sequence's context lives in the paged KV cache. Q/K/V and the
gate/up projections are fused into single matrices so each layer does two large matmuls instead of five.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gllm.config import ModelConfig
from gllm.model.rope import RotaryEmbedding, apply_rope
from gllm.ops import AttentionMetadata
from gllm.ops.backend import BACKENDS, AttentionBackend
from gllm.ops.linear import Kernel, make_kernel


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` whose product can be handed to a repacked kernel (``gllm.ops.linear``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.kernel: Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.kernel is None else self.kernel(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """``rope``: this step's cos / sin tables; queries and keys are rotated in one go."""
        n = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = apply_rope(qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        attn.write_kv(kv_cache, k, v.reshape(n, self.num_kv_heads, self.head_dim), meta.slot_mapping)
        out = attn.attend(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(n, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate and up in one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv_cache, meta, attn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """A Llama causal LM over the paged KV cache; ``attn`` picks the attention kernels (default: torch)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, attn: AttentionBackend = BACKENDS["torch"]):
        super().__init__()
        self.config = cfg
        self.attn = attn
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_kernel: Kernel | None = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Run ``T`` packed tokens through the network; return float32 logits for ``logits_indices`` only."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta, self.attn)
        x = self.norm(x[logits_indices])
        if self.head_kernel is not None:
            return self.head_kernel(x).float()
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def pack_weights(self, quantize: str | None = None) -> None:
        """Repack every matrix product's weight for the CPU kernels of ``gllm.ops.linear`` (after loading).

        The dense copies of the layers' weights are dropped; the embedding stays (a tied head packs a copy).
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = make_kernel(module.weight.detach(), quantize)
                module.weight = None
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.head_kernel = make_kernel(head.detach(), quantize)
        if self.lm_head is not None:
            self.lm_head.weight = None

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take Hugging Face-named tensors, fusing Q/K/V and gate/up into this model's matrices."""
        own = self.state_dict()
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            own[f"layers.{i}.self_attn.qkv_proj.weight"].copy_(
                torch.cat([weights[attn + f"{n}_proj.weight"] for n in "qkv"])
            )
            own[f"layers.{i}.self_attn.o_proj.weight"].copy_(weights[attn + "o_proj.weight"])
            own[f"layers.{i}.mlp.gate_up_proj.weight"].copy_(
                torch.cat([weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]])
            )
            own[f"layers.{i}.mlp.down_proj.weight"].copy_(weights[mlp + "down_proj.weight"])
            for norm in ("input_layernorm", "post_attention_layernorm"):
                own[f"layers.{i}.{norm}.weight"].copy_(weights[p + norm + ".weight"])
        own["embed_tokens.weight"].copy_(weights["model.embed_tokens.weight"])
        own["norm.weight"].copy_(weights["model.norm.weight"])
        if self.lm_head is not None:
            own["lm_head.weight"].copy_(weights["lm_head.weight"])
