"""A LoRA adapter fitted to one model: its updates laid out for the model's fused matrices.

The model multiplies Q, K and V with one fused matrix (``qkv_proj``) and gate and up with another
(``gate_up_proj``). An adapter's updates for those projections are laid out the same way, per *site*
(a fused matrix of one layer): one ``A`` for the whole site, whose columns are the projections' ranks
side by side, so that ``u = x @ A`` is one product, then one ``B`` per projection adding into that
projection's output columns. Scales are folded into ``B``.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from gllm.config import ModelConfig
from gllm.lora.files import TARGETS, AdapterError, LoraTensors

# site (the model's module name under ``layers.N.``) -> its projections, in the order of its output columns
SITES = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}

_uids = itertools.count(1)  # adapter identities are never reused in a process (prefix-cache keys hold them)


@dataclass
class SitePart:
    """One projection's share of a site: ``y[:, out] += u[:, cols] @ b``."""

    out: slice
    cols: slice
    b: torch.Tensor  # [rank, out columns], scale included; stacked: [adapters, rank, out columns]


@dataclass
class SiteUpdate:
    """The low-rank update of one site for one or several adapters (see ``gllm.lora.grouped``)."""

    a: torch.Tensor  # [in, total rank]; stacked (``gllm.lora.grouped``): [adapters, in, total rank]
    parts: list[SitePart]
    kernel_args: Any = field(default=None, repr=False, compare=False)  # a stack's, as the CPU kernel reads it


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every projection an adapter may change, under ``model.layers.N.`` names."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    h, ffn = config.hidden_size, config.intermediate_size
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h),
                 "mlp.down_proj": (h, ffn)}  # fmt: skip
    return {f"model.layers.{i}.{k}": v for i in range(config.num_layers) for k, v in per_layer.items()}


class LoraAdapter:
    """A named adapter fitted to a model, its updates in ``dtype`` on ``device``.

    ``uid`` is unique in the process: the prefix cache keys blocks by it, so KV computed under one
    adapter is never served to a request of another, nor to a later adapter loaded under the same name.
    """

    def __init__(self, name: str, tensors: LoraTensors, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.name = name
        self.source = tensors.source
        self.uid = next(_uids)
        shapes = projection_shapes(config)
        for module, pair in tensors.pairs.items():
            if module not in shapes:
                raise AdapterError(f"{tensors.source}: {module} is not a projection of this model "
                                   f"({config.num_layers} layers; adaptable: {', '.join(TARGETS)})")  # fmt: skip
            out, inp = shapes[module]
            rank = pair.a.shape[0] if pair.a.ndim == 2 else -1
            if pair.a.shape != (rank, inp) or pair.b.shape != (out, rank) or rank < 1:
                raise AdapterError(
                    f"{tensors.source}: {module} has A {tuple(pair.a.shape)} and B {tuple(pair.b.shape)}; this model "
                    f"needs A (r, {inp}) and B ({out}, r): the adapter was made for another base model"
                )
            if not (torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()):
                raise AdapterError(f"{tensors.source}: {module} holds values that are not finite")
        self.sites: dict[str, SiteUpdate] = {}
        for layer in range(config.num_layers):
            for site, projections in SITES.items():
                update = self._site(tensors, f"model.layers.{layer}.", projections, shapes, dtype, device)
                if update is not None:
                    self.sites[f"layers.{layer}.{site}"] = update
        self.num_parameters = sum(p.a.numel() + p.b.numel() for p in tensors.pairs.values())
        self.fingerprint = adapter_fingerprint(tensors)

    @staticmethod
    def _site(tensors: LoraTensors, prefix: str, projections: tuple[str, ...], shapes, dtype, device) -> SiteUpdate | None:
        a_cols, parts = [], []
        out_start = col = 0
        for proj in projections:
            out = shapes[prefix + proj][0]
            pair = tensors.pairs.get(prefix + proj)
            if pair is not None:
                rank = pair.a.shape[0]
                a_cols.append(pair.a.t())
                b = (pair.b * pair.scale).t().to(device, dtype).contiguous()
                parts.append(SitePart(slice(out_start, out_start + out), slice(col, col + rank), b))
                col += rank
            out_start += out
        if not parts:
            return None
        return SiteUpdate(torch.cat(a_cols, dim=1).to(device, dtype).contiguous(), parts)

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, {len(self.sites)} sites, from {self.source})"


def adapter_fingerprint(tensors: LoraTensors, samples: int = 64) -> str:
    """A short hex digest of what an adapter changes (each projection's name, shapes, scale and a sample of
    its values), which a saved state computed under it records: restored K/V must come from the same
    adapter, not just one of the same name."""
    digest = hashlib.blake2b(digest_size=16)
    for module in sorted(tensors.pairs):
        pair = tensors.pairs[module]
        digest.update(f"{module}{tuple(pair.a.shape)}{tuple(pair.b.shape)}{pair.scale!r}".encode())
        for t in (pair.a, pair.b):
            flat = t.detach().reshape(-1)
            count = min(flat.numel(), samples)
            index = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)  # evenly spaced, both ends
            digest.update(flat[index].float().cpu().numpy().tobytes())
    return digest.hexdigest()
