"""The Llama network, from scratch: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU, output head.

It works on packed batches: ``T`` new tokens of many sequences in one flat tensor, their positions, and an
``AttentionMetadata`` that says where each sequence's context lives in the paged KV cache. Q/K/V and the
gate/up projections are fused into single matrices so each layer does two large matmuls instead of five.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gllm.config import ModelConfig
from gllm.model.rope import RotaryEmbedding
from gllm.ops import AttentionMetadata
from gllm.ops.backend import BACKENDS, AttentionBackend
from gllm.ops.linear import BlockLinear, BlockWeight, Kernel, block_products_supported, make_kernel


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation. It is applied with
    the residual add before it (the backend's ``add_rms_norm``): ``(norm(x + residual), x + residual)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual, ops: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` whose product can be handed to a repacked kernel (``gllm.ops.linear``).

    ``lora``, when adapters are loaded (``gllm.lora``), adds per-row low-rank updates beside the base
    product, whatever kernel computed it: ``lora(x, y)`` returns ``y`` plus the step's updates."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.kernel: Kernel | None = None
        self.lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.kernel is None else self.kernel(x)
        return y if self.lora is None else self.lora(x, y)


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
        """``rope``: this step's cos / sin tables; queries and keys are rotated, and K/V stored, in one go."""
        q = attn.rope_write_kv(self.qkv_proj(x), *rope, kv_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
        out = attn.attend(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(x.shape[0], self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate and up in one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, ops: AttentionBackend) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, kv_cache, meta, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the last sub-layer's output, not yet added to ``residual`` (``None`` before the first layer).
        Returns this layer's MLP output and the residual stream before it."""
        h, residual = self.input_layernorm(x, residual, ops)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, kv_cache, meta, ops), residual, ops)
        return self.mlp(h, ops), residual


class LlamaModel(nn.Module):
    """A Llama causal LM over the paged KV cache; ``attn`` picks the attention kernels (default: torch)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, attn: AttentionBackend | None = None):
        super().__init__()
        self.config = cfg
        self.attn = attn or BACKENDS["torch"]()
        # An empty weight instead of nn.Embedding's random one (``load_weights`` fills it): that init, on the meta
        # device where ``empty`` builds, would import torch._dynamo and with it Triton into every CPU run.
        embedding = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_kernel: Kernel | None = None

    @classmethod
    def empty(
        cls, cfg: ModelConfig, max_positions: int, attn: AttentionBackend, dtype: torch.dtype, device: torch.device
    ) -> LlamaModel:
        """A model in ``dtype`` on ``device`` whose parameters are allocated but not initialised, for
        ``load_weights`` to fill: no random initialisation and no float32 copy of every weight first."""
        with torch.device("meta"):
            net = cls(cfg, max_positions, attn).to(dtype)
        net.to_empty(device=device)
        # the RoPE tables are computed, not loaded
        net.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling).to(device, dtype)
        return net

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
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rope.tables(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta, self.attn)
        x, _ = self.norm(x[logits_indices], residual[logits_indices], self.attn)
        if self.head_kernel is not None:
            return self.head_kernel(x).float()
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def pack_weights(self, quantize: str | None = None, blocks: dict[str, BlockWeight] | None = None) -> None:
        """Repack every matrix product's weight for the CPU kernels of ``gllm.ops.linear`` (after loading).

        The dense copies of the layers' weights are dropped; the embedding stays (a tied head packs a copy).
        ``blocks`` (Hugging Face names, as ``LoadedModel.blocks``) are the block-quantized originals of
        those weights: where the CPU can multiply from them, decode steps read those instead.
        """
        sources = self._block_sources(blocks or {}) if blocks and block_products_supported() else {}
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                module.kernel = make_kernel(module.weight.detach(), quantize)
                module.weight = None
                if (source := sources.get(name)) is not None:
                    module.kernel = BlockLinear(source, module.kernel)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.head_kernel = make_kernel(head.detach(), quantize)
        if self.lm_head is not None:
            self.lm_head.weight = None
        if (source := sources.get("head")) is not None:
            self.head_kernel = BlockLinear(source, self.head_kernel)

    def _block_sources(self, blocks: dict[str, BlockWeight]) -> dict[str, BlockWeight]:
        """This model's matrices (module names, ``head``) whose every part comes in blocks of one kind."""
        parts = {"head": ["model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight"]}
        for i in range(self.config.num_layers):
            p, ours = f"model.layers.{i}.", f"layers.{i}."
            parts[ours + "self_attn.qkv_proj"] = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            parts[ours + "self_attn.o_proj"] = [p + "self_attn.o_proj.weight"]
            parts[ours + "mlp.gate_up_proj"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
            parts[ours + "mlp.down_proj"] = [p + "mlp.down_proj.weight"]
        sources = {}
        for module, names in parts.items():
            if all(n in blocks for n in names) and (joined := BlockWeight.cat([blocks[n] for n in names])):
                if joined.blocks.shape[0] % 16 == 0:
                    sources[module] = joined
        return sources

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
