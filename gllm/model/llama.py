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
from gllm.model.rope import RotaryEmbedding
from gllm.ops import AttentionMetadata
from gllm.ops.backend import BACKENDS, AttentionBackend
from gllm.ops.block_linear import BlockEmbedding, BlockLinear, BlockWeight
from gllm.ops.linear import Kernel, make_kernel


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
        self.embed_kernel: BlockEmbedding | None = None

    @classmethod
    def empty(
        cls, cfg: ModelConfig, max_positions: int, attn: AttentionBackend, dtype: torch.dtype, device: torch.device,
        blocks: dict[str, BlockWeight] | None = None,
    ) -> LlamaModel:  # fmt: skip
        """A model in ``dtype`` on ``device`` whose parameters are allocated but not initialised, for
        ``load_weights`` to fill: no random initialisation and no float32 copy of every weight first.

        ``blocks`` (Hugging Face names, as ``LoadedModel.blocks``; CPU only): each matrix whose every part
        is among them multiplies straight from them (``BlockLinear``), and a block-quantized embedding is
        looked up from its blocks: those get no dense weight at all."""
        with torch.device("meta"):
            net = cls(cfg, max_positions, attn).to(dtype)
        if blocks:
            net._use_blocks(blocks, dtype)
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
        x = self.embed_tokens(input_ids) if self.embed_kernel is None else self.embed_kernel(input_ids)
        residual = None
        rope = self.rope.tables(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta, self.attn)
        x, _ = self.norm(x[logits_indices], residual[logits_indices], self.attn)
        if self.head_kernel is not None:
            return self.head_kernel(x).float()
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def pack_weights(self, quantize: str | None = None) -> None:
        """Repack every dense matrix product's weight for the CPU kernels of ``gllm.ops.linear`` (after
        loading, bfloat16). The dense copies of the layers' weights are dropped; the embedding stays (a
        tied head packs a copy). Matrices that multiply from blocks are left as they are."""
        for module in self.modules():
            if isinstance(module, Linear) and module.weight is not None:
                module.kernel = make_kernel(module.weight.detach(), quantize)
                module.weight = None
        if self.head_kernel is None:
            head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            self.head_kernel = make_kernel(head.detach(), quantize)
            if self.lm_head is not None:
                self.lm_head.weight = None

    def matrices(self) -> dict[str, list[str]]:
        """Each matrix product of this model (module name, ``head`` for the output head) and the Hugging
        Face weights it concatenates, in order."""
        parts = {"head": ["model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight"]}
        for i in range(self.config.num_layers):
            p, ours = f"model.layers.{i}.", f"layers.{i}."
            parts[ours + "self_attn.qkv_proj"] = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            parts[ours + "self_attn.o_proj"] = [p + "self_attn.o_proj.weight"]
            parts[ours + "mlp.gate_up_proj"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
            parts[ours + "mlp.down_proj"] = [p + "mlp.down_proj.weight"]
        return parts

    def _use_blocks(self, blocks: dict[str, BlockWeight], dtype: torch.dtype) -> None:
        """Hand matrices whose parts all come in blocks to ``BlockLinear`` (the head returns float32
        logits straight away), and a block-quantized embedding to ``BlockEmbedding``; drop their weights."""
        for module_name, names in self.matrices().items():
            if not all(n in blocks for n in names):
                continue
            if module_name == "head":
                self.head_kernel = BlockLinear([blocks[n] for n in names], out_dtype=torch.float32)
                if self.lm_head is not None:
                    self.lm_head.weight = None
            else:
                module = self.get_submodule(module_name)
                module.kernel, module.weight = BlockLinear([blocks[n] for n in names]), None
        if (embedding := blocks.get("model.embed_tokens.weight")) is not None:
            self.embed_kernel = BlockEmbedding(embedding, dtype)
            self.embed_tokens.weight = None

    def load_weights(self, weights: dict[str, torch.Tensor], blocks: dict[str, BlockWeight] | None = None) -> None:
        """Fill every dense parameter from Hugging Face-named tensors, fusing Q/K/V and gate/up into this
        model's matrices. A part that came in ``blocks`` but whose matrix is dense (its other parts are
        not in blocks) is dequantized here."""
        blocks = blocks or {}

        def dense(name: str) -> torch.Tensor:
            return weights[name] if name in weights else blocks[name].dequantize()

        matrices = self.matrices()
        for module_name, names in matrices.items():
            if module_name != "head":
                module = self.get_submodule(module_name)
                if module.weight is not None:
                    module.weight.data.copy_(torch.cat([dense(n) for n in names]))
        if self.lm_head is not None and self.lm_head.weight is not None:
            self.lm_head.weight.data.copy_(dense("lm_head.weight"))
        if self.embed_tokens.weight is not None:
            self.embed_tokens.weight.data.copy_(dense("model.embed_tokens.weight"))
        for i, layer in enumerate(self.layers):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, norm).weight.data.copy_(weights[f"model.layers.{i}.{norm}.weight"])
        self.norm.weight.data.copy_(weights["model.norm.weight"])
