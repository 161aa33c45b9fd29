"""The decoder every supported family runs on, from scratch: embedding, RMSNorm, RoPE, grouped-query
attention, a gated MLP, output head.

Llama is the base; each other family is a few named switches of its ``ModelConfig`` (`gllm.config`):
Q/K/V bias (Qwen2.5), per-head q/k norm (Qwen3, Gemma 3), norms around both sub-layers, GeGLU, scaled
embeddings and soft-capped scores and logits (Gemma 2 / 3), sliding-window layers with their own RoPE
base (Gemma, Mistral), partial rotary (Phi-4-mini) or none at all on some layers (SmolLM3). The
attention kernels are the same for all: a layer hands its window and soft-cap to the backend.

It works on packed batches: ``T`` new tokens of many sequences in one flat tensor, their positions, and an
``AttentionMetadata`` that says where each sequence's context lives in the paged KV cache. Q/K/V and the
gate/up projections are fused into single matrices so each layer does two large matmuls instead of five.

Inside a step, layers and their parts are called through ``.forward``: ``nn.Module.__call__`` checks for
hooks on every call, and a step makes about nine such calls per layer, which on a small model is a
measurable part of a single stream's step on the CPU (``benchmarks/cpu_step.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gllm.config import ModelConfig
from gllm.model.rope import RotaryEmbedding, query_scales, rotary_row_order
from gllm.ops import AttentionMetadata
from gllm.ops.backend import BACKENDS, AttentionBackend
from gllm.ops.block_linear import BlockEmbedding, BlockLinear, BlockWeight
from gllm.ops.invariant import Product, dense
from gllm.ops.linear import Kernel, make_kernel

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation. It is applied with
    the residual add before it (the backend's ``add_rms_norm``): ``(norm(x + residual), x + residual)``;
    with ``residual`` None it norms ``x`` alone."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual, ops: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """An ``nn.Linear`` whose product can be handed to a repacked kernel (``gllm.ops.linear``); the bias,
    if any, is added after it.

    ``lora``, when adapters are loaded (``gllm.lora``), adds per-row low-rank updates beside the base
    product, whatever kernel computed it: ``lora(x, y)`` returns ``y`` plus the step's updates."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.kernel: Kernel | None = None
        self.lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dense(x, self.weight) if self.kernel is None else self.kernel(x)
        y = y if self.bias is None else y + self.bias
        return y if self.lora is None else self.lora(x, y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.attention_scale
        self.window, self.softcap = cfg.window(layer), cfg.attn_logit_softcap
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rope``: this step's cos / sin tables for this layer; queries and keys are rotated, and K/V
        stored, in one go. ``q_scale``: a multiplier per query token (``[T, 1, 1]``), if the family has one."""
        qkv = self.qkv_proj.forward(x)
        if self.q_norm is not None:
            qkv = self._norm_heads(qkv, attn)
        q = attn.rope_write_kv(qkv, *rope, kv_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
        if q_scale is not None:
            q = q * q_scale
        out = attn.attention(q, kv_cache, meta, self.scale, window=self.window, softcap=self.softcap)
        return self.o_proj.forward(out.reshape(x.shape[0], self.q_size))

    def _norm_heads(self, qkv: torch.Tensor, ops: AttentionBackend) -> torch.Tensor:
        """RMSNorm over each query and key head of the fused ``qkv [T, (H + 2 KV) * D]`` (values untouched)."""
        n, dim = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, _ = self.q_norm.forward(q.reshape(-1, dim), None, ops)
        k, _ = self.k_norm.forward(k.reshape(-1, dim), None, ops)
        return torch.cat([q.view(n, -1), k.view(n, -1), v], dim=-1)


class MLP(nn.Module):
    """Gated feed-forward ``down(act(gate(x)) * up(x))``, gate and up in one matmul; ``act`` is SiLU
    (SwiGLU) or tanh-approximated GELU (GeGLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gelu = cfg.hidden_act == "gelu_tanh"
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, ops: AttentionBackend) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        return self.down_proj.forward(ops.gelu_tanh_mul(gate_up) if self.gelu else ops.silu_mul(gate_up))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP; with ``sandwich_norms`` (Gemma) each sub-layer's output is normed too.

    Module names follow Hugging Face's per family: ``post_attention_layernorm`` is the norm before the MLP
    in Llama and the norm of the attention output in Gemma (whose norm before the MLP is
    ``pre_feedforward_layernorm``)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.rope_kind = rope_kind(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, rope, kv_cache, meta, ops, q_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the last sub-layer's output, not yet added to ``residual`` (``None`` before the first layer).
        Returns this layer's MLP output and the residual stream before it."""
        h, residual = self.input_layernorm.forward(x, residual, ops)
        h = self.self_attn.forward(h, rope, kv_cache, meta, ops, q_scale)
        if not self.sandwich:
            h, residual = self.post_attention_layernorm.forward(h, residual, ops)
            return self.mlp.forward(h, ops), residual
        h, _ = self.post_attention_layernorm.forward(h, None, ops)
        h, residual = self.pre_feedforward_layernorm.forward(h, residual, ops)
        h, _ = self.post_feedforward_layernorm.forward(self.mlp.forward(h, ops), None, ops)
        return h, residual


def rope_kind(cfg: ModelConfig, layer: int) -> str:
    """Which RoPE table a layer uses: ``none`` (SmolLM3's layers without RoPE), ``local`` (Gemma 3's
    sliding-window layers, with their own base) or ``global``."""
    if layer in cfg.nope_layers:
        return "none"
    if cfg.local_rope_theta is not None and layer in cfg.local_layers:
        return "local"
    return "global"


def rope_tables(cfg: ModelConfig, max_positions: int) -> nn.ModuleDict:
    """The RoPE tables the layers of ``cfg`` use, by ``rope_kind``."""
    kinds = {rope_kind(cfg, i) for i in range(cfg.num_layers)}
    dim, rotary = cfg.head_dim, cfg.rotary_dim
    tables = {
        "global": lambda: RotaryEmbedding(dim, max_positions, cfg.rope_theta, cfg.rope_scaling, rotary),
        "local": lambda: RotaryEmbedding(dim, max_positions, cfg.local_rope_theta, None, rotary),
        "none": lambda: RotaryEmbedding(dim, max_positions, cfg.rope_theta, None, rotary_dim=0),
    }
    return nn.ModuleDict({kind: make() for kind, make in tables.items() if kind in kinds})


class LlamaModel(nn.Module):
    """A causal LM of any supported family over the paged KV cache; ``attn`` picks the attention kernels
    (default: torch)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, attn: AttentionBackend | None = None):
        super().__init__()
        self.config = cfg
        self.attn = attn or BACKENDS["torch"]()
        # An empty weight instead of nn.Embedding's random one (``load_weights`` fills it): that init, on the meta
        # device where ``empty`` builds, would import torch._dynamo and with it Triton into every CPU run.
        embedding = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._position_tables(max_positions)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_kernel: Kernel | None = None
        self.embed_kernel: BlockEmbedding | None = None

    def _position_tables(self, max_positions: int) -> None:
        """What is computed from positions, never loaded: RoPE tables and Ministral 3's query scales."""
        self.ropes = rope_tables(self.config, max_positions)
        self.query_scales = query_scales(self.config.rope_scaling, max_positions)

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
        net._position_tables(max_positions)  # computed, not loaded
        net.ropes.to(device, dtype)
        if net.query_scales is not None:
            net.query_scales = net.query_scales.to(device)
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
        if self.config.embedding_multiplier != 1.0:  # in the model's dtype, as Gemma does
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        tables = {kind: rope.tables(positions, x.dtype) for kind, rope in self.ropes.items()}
        q_scale = None if self.query_scales is None else self.query_scales[positions].to(x.dtype)[:, None, None]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer.forward(x, residual, tables[layer.rope_kind], kv_cache, meta, self.attn, q_scale)
        x, _ = self.norm.forward(x[logits_indices], residual[logits_indices], self.attn)
        logits = self.head(x).float()
        if (cap := self.config.final_logit_softcap) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (the output head's product)."""
        if self.head_kernel is not None:
            return self.head_kernel(x)
        return dense(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    def products(self) -> list[tuple[Product, int, torch.dtype]]:
        """One of each kind and shape of matrix product the model runs, with its input width and dtype
        (for ``gllm.ops.invariant.probe_mode``)."""
        dtype, found = self.norm.weight.dtype, {}
        for module in self.modules():
            if isinstance(module, Linear):
                found.setdefault((type(module.kernel), module.in_features, module.out_features), module)
        return [(product, key[1], dtype) for key, product in found.items()] + [(self.head, self.config.hidden_size, dtype)]

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

    def _use_blocks(self, blocks: dict[str, BlockWeight], dtype: torch.dtype) -> None:
        """Hand matrices whose parts all come in blocks to ``BlockLinear`` (the head returns float32
        logits straight away), and a block-quantized embedding to ``BlockEmbedding``; drop their weights."""
        for module_name, parts in self._block_sources(blocks).items():
            if module_name == "head":
                self.head_kernel = BlockLinear(parts, out_dtype=torch.float32)
                if self.lm_head is not None:
                    self.lm_head.weight = None
            else:
                module = self.get_submodule(module_name)
                module.kernel, module.weight = BlockLinear(parts), None
        if (embedding := blocks.get("model.embed_tokens.weight")) is not None:
            self.embed_kernel = BlockEmbedding(embedding, dtype)
            self.embed_tokens.weight = None

    def _block_sources(self, blocks: dict[str, BlockWeight]) -> dict[str, list[BlockWeight]]:
        """This model's matrices (module names, ``head``) whose every part comes in blocks, as the parts
        ``BlockLinear`` concatenates (rows in this model's order; the parts may differ in type)."""
        raw = {name: b.blocks for name, b in blocks.items()}
        head = "model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight"
        sources = {"head": [blocks[head]]} if head in blocks else {}
        for i in range(self.config.num_layers):
            p, ours = f"model.layers.{i}.", f"layers.{i}."
            for module, (names, rows) in self._matrices(p).items():
                if all(n in raw for n in names):
                    parts = rows(raw, names) if rows else [raw[n] for n in names]
                    kinds = [blocks[n].kind for n in names] if len(names) == len(parts) else [blocks[names[0]].kind] * len(parts)
                    sources[ours + module] = [BlockWeight(kind, part) for kind, part in zip(kinds, parts)]
        return sources

    def _matrices(self, p: str) -> dict[str, tuple[list[str], Callable | None]]:
        """A layer's matrix products (``p``: its Hugging Face prefix): the checkpoint names each joins, and
        how their rows become this model's (None: as they are)."""
        return {
            "self_attn.qkv_proj": (self._qkv_names(p, "weight"), self._qkv_rows),
            "self_attn.o_proj": ([p + "self_attn.o_proj.weight"], None),
            "mlp.gate_up_proj": (self._gate_up_names(p), self._gate_up_rows),
            "mlp.down_proj": ([p + "mlp.down_proj.weight"], None),
        }

    def _qkv_names(self, p: str, suffix: str) -> list[str]:
        if self.config.fused_checkpoint:
            return [f"{p}self_attn.qkv_proj.{suffix}"]
        return [f"{p}self_attn.{n}_proj.{suffix}" for n in "qkv"]

    def _gate_up_names(self, p: str) -> list[str]:
        if self.config.fused_checkpoint:
            return [p + "mlp.gate_up_proj.weight"]
        return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]

    def _qkv_rows(self, source: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """Q, K and V rows (fused or not in the checkpoint), Q and K heads' dimensions in this model's order."""
        cfg = self.config
        if len(names) == 1:
            q, k, v = source[names[0]].split([cfg.num_heads * cfg.head_dim, *[cfg.num_kv_heads * cfg.head_dim] * 2])
        else:
            q, k, v = (source[n] for n in names)
        return [self._rotary_rows(q, cfg.num_heads), self._rotary_rows(k, cfg.num_kv_heads), v]

    def _gate_up_rows(self, source: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        return list(source[names[0]].chunk(2)) if len(names) == 1 else [source[n] for n in names]

    def _rotary_rows(self, rows: torch.Tensor, heads: int) -> torch.Tensor:
        """Reorder each head's rows for partial rotary (``gllm.model.rope.rotary_row_order``); any rank."""
        cfg = self.config
        if cfg.rotary_dim is None:
            return rows
        order = rotary_row_order(cfg.head_dim, cfg.rotary_dim).to(rows.device)
        return rows.reshape(heads, cfg.head_dim, *rows.shape[1:]).index_select(1, order).reshape(rows.shape)

    def load_weights(self, weights: dict[str, torch.Tensor], blocks: dict[str, BlockWeight] | None = None) -> None:
        """Take Hugging Face-named tensors (``gllm.loader.weight_shapes``), fusing Q/K/V and gate/up. Matrices
        that multiply from ``blocks`` have no dense weight to fill; a part that came in blocks but whose
        matrix is dense (its other parts are not in blocks) is dequantized here."""
        own, cfg = self.state_dict(), self.config
        source = _Dense(weights, blocks or {})
        for i in range(cfg.num_layers):
            p, ours = f"model.layers.{i}.", f"layers.{i}."
            for module, (names, rows) in self._matrices(p).items():
                if ours + module + ".weight" in own:
                    parts = rows(source, names) if rows else [source[n] for n in names]
                    own[ours + module + ".weight"].copy_(torch.cat(parts))
            if cfg.qkv_bias:
                own[ours + "self_attn.qkv_proj.bias"].copy_(torch.cat(self._qkv_rows(weights, self._qkv_names(p, "bias"))))
            for norm in cfg.layer_norms():
                weight = weights[p + norm + ".weight"]
                if norm.startswith("self_attn."):  # q/k norms act on head dimensions
                    weight = self._rotary_rows(weight, 1)
                own[ours + norm + ".weight"].copy_(weight)
        if "embed_tokens.weight" in own:
            own["embed_tokens.weight"].copy_(source["model.embed_tokens.weight"])
        own["norm.weight"].copy_(weights["model.norm.weight"])
        if "lm_head.weight" in own:
            own["lm_head.weight"].copy_(source["lm_head.weight"])


class _Dense(dict):
    """Weights by name; one that came only in blocks is dequantized when asked for (and not kept)."""

    def __init__(self, weights: dict[str, torch.Tensor], blocks: dict[str, BlockWeight]):
        super().__init__(weights)
        self.blocks = blocks

    def __missing__(self, name: str) -> torch.Tensor:
        return self.blocks[name].dequantize()
