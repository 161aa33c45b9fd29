"""What a GGUF file's architecture means: its metadata as a `ModelConfig`, and its tensor names.

llama.cpp's converter (``convert_hf_to_gguf.py``) decides how each family is written, and its loader
(``src/llama-model.cpp``, ``src/models/*.cpp``) fills in what the file leaves out; this module follows both:

* ``llama`` (Llama, Mistral), ``smollm3`` and ``mistral3`` files store Q and K rows permuted for
  llama.cpp's rotate-adjacent-pairs RoPE (undone by the loader); ``qwen2``, ``qwen3``, ``gemma2``,
  ``gemma3`` and ``phi3`` files are not permuted.
* Gemma's norm weights already include the ``+1`` its Hugging Face checkpoints leave to the code.
* Facts not in the file: Gemma's attention scale (``1/sqrt(head_dim)``, but ``1/sqrt(hidden/heads)`` for
  the 27B models), the layers that are local (every 2nd for Gemma 2, 5 of every 6 for Gemma 3, unless the
  file lists a pattern), SmolLM3's layers without RoPE (every 4th).
* llama.cpp runs ``llama`` and ``phi3`` files without a sliding window, and so does this loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gllm.config import ModelConfig
from gllm.loader import ModelLoadError
from gllm.loader.gguf_index import GGUFIndex

# GGUF tensor name stem -> Hugging Face name stem; per-layer ones sit under blk.N. / model.layers.N.
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER_TENSORS = {  # Gemma norms the attention output too, and names the norm before the MLP apart
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

_REQUIRED = object()
Meta = Callable[..., Any]  # meta(key suffix, default) -> value under "{arch}."


@dataclass(frozen=True)
class Architecture:
    family: str  # ModelConfig.family
    permuted: bool  # Q/K rows in llama.cpp's interleaved order
    switches: Callable[[Meta, GGUFIndex, dict[str, Any]], dict[str, Any]]  # family switches, given the base fields
    layer_tensors: dict[str, str] = field(default_factory=dict)  # overrides of LAYER_TENSORS
    partial_rotary: bool = False  # rope.dimension_count may be less than the head size

    def hf_name(self, gguf_name: str) -> str | None:
        """Hugging Face name of a GGUF tensor, or None for tensors gLLM does not use."""
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in GLOBAL_TENSORS:
            return f"{GLOBAL_TENSORS[stem]}.{suffix}"
        parts = stem.split(".")
        names = {**LAYER_TENSORS, **self.layer_tensors}
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
            return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
        return None

    def gguf_name(self, hf_name: str) -> str:
        """Inverse of `hf_name`, for naming a missing tensor the way the file would."""
        stem, _, suffix = hf_name.rpartition(".")
        for gguf_stem, hf_stem in GLOBAL_TENSORS.items():
            if stem == hf_stem:
                return f"{gguf_stem}.{suffix}"
        _, _, layer, layer_stem = stem.split(".", 3)
        names = {**LAYER_TENSORS, **self.layer_tensors}
        gguf_stem = next(g for g, h in reversed(names.items()) if h == layer_stem)
        return f"blk.{layer}.{gguf_stem}.{suffix}"


def _floats(index: GGUFIndex, name: str) -> list[float]:
    tensor = next(t for t in index.tensors if t.name == name)
    return np.asarray(index.data(tensor), dtype=np.float32).reshape(-1).tolist()


def _llama(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    """Llama 3.1+ files carry their RoPE scaling as per-frequency divisors (``rope_freqs``)."""
    if any(t.name == "rope_freqs.weight" for t in index.tensors):
        return {"rope_scaling": {"rope_type": "freq_factors", "factors": _floats(index, "rope_freqs.weight")}}
    return {}


def _qwen2(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": any(t.name == "blk.0.attn_q.bias" for t in index.tensors)}


def _qwen3(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    return {"qk_norm": True}


def _pattern(meta: Meta, layers: int, every: int) -> tuple[int, ...]:
    """Local layers: the file's pattern (an int ``n``: all but every ``n``-th layer; or a list of flags),
    else llama.cpp's default for the family."""
    pattern = meta("attention.sliding_window_pattern", every)
    if isinstance(pattern, list):
        return tuple(i for i, local in enumerate(pattern) if local)
    return tuple(i for i in range(layers) if pattern == 0 or i % pattern < pattern - 1)


def _gemma(meta: Meta, base: dict[str, Any], big: int) -> dict[str, Any]:
    """What Gemma 2 and 3 share; ``big``: the layer count of the 27B model, whose attention scale differs."""
    layers, hidden, heads = base["num_layers"], base["hidden_size"], base["num_heads"]
    return {
        "norm_offset": 1.0,
        "sandwich_norms": True,
        "hidden_act": "gelu_tanh",
        "embedding_multiplier": math.sqrt(hidden),
        "query_pre_attn_scalar": float(hidden // heads if layers == big else base["head_dim"]),
    }


def _gemma2(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    return {
        **_gemma(meta, base, big=46),
        "attn_logit_softcap": float(meta("attn_logit_softcapping", 50.0)),
        "final_logit_softcap": float(meta("final_logit_softcapping", 30.0)),
        "sliding_window": int(meta("attention.sliding_window", 4096)),
        "local_layers": _pattern(meta, base["num_layers"], 2),
        "local_rope_theta": float(meta("rope.freq_base_swa", base["rope_theta"])),
    }


def _gemma3(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    window = int(meta("attention.sliding_window", 0))
    final = meta("final_logit_softcapping", None)
    local = {
        "sliding_window": window,
        "local_layers": _pattern(meta, base["num_layers"], 6),
        "local_rope_theta": float(meta("rope.freq_base_swa", 10000.0)),
    }
    return {
        **_gemma(meta, base, big=62),
        "qk_norm": True,
        "final_logit_softcap": float(final) if final else None,
        **(local if window > 0 else {}),
    }


def _phi3(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    switches: dict[str, Any] = {"fused_checkpoint": True}
    rotary = int(meta("rope.dimension_count", base["head_dim"]))
    if rotary != base["head_dim"]:
        switches["rotary_dim"] = rotary
    if any(t.name == "rope_factors_long.weight" for t in index.tensors):
        switches["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": _floats(index, "rope_factors_long.weight"),
            "short_factor": _floats(index, "rope_factors_short.weight"),
            "original_max_position_embeddings": int(meta("rope.scaling.original_context_length")),
            "attention_factor": float(meta("rope.scaling.attn_factor", 1.0)),
        }
    return switches


def _smollm3(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    return {"nope_layers": tuple(i for i in range(base["num_layers"]) if (i + 1) % 4 == 0)}


def _mistral3(meta: Meta, index: GGUFIndex, base: dict[str, Any]) -> dict[str, Any]:
    """Ministral 3: YaRN, and a query scale that grows with the position (``attention.temperature_scale``).
    The file keeps YaRN's ``mscale_all_dim`` (``yarn_log_multiplier``) but not ``mscale``; Ministral 3's are
    equal, which makes YaRN's attention factor 1."""
    scaling = dict(base["rope_scaling"] or {})
    if scaling.get("rope_type") == "yarn":
        scaling["beta_fast"] = float(meta("rope.scaling.yarn_beta_fast", 32.0))
        scaling["beta_slow"] = float(meta("rope.scaling.yarn_beta_slow", 1.0))
        if (attention := meta("rope.scaling.yarn_attn_factor", None)) is not None:
            scaling["attention_factor"] = float(attention)
        elif (log_mul := meta("rope.scaling.yarn_log_multiplier", None)) is not None:
            scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul)
    if (beta := meta("attention.temperature_scale", None)) is not None:
        scaling["llama_4_scaling_beta"] = float(beta)
        scaling.setdefault("original_max_position_embeddings", int(meta("rope.scaling.original_context_length")))
    return {"rope_scaling": scaling or None}


ARCHITECTURES = {
    "llama": Architecture("llama", True, _llama),
    "mistral3": Architecture("ministral3", True, _mistral3),
    "smollm3": Architecture("smollm3", True, _smollm3),
    "qwen2": Architecture("qwen2", False, _qwen2),
    "qwen3": Architecture("qwen3", False, _qwen3),
    "gemma2": Architecture("gemma2", False, _gemma2, GEMMA_LAYER_TENSORS),
    "gemma3": Architecture("gemma3_text", False, _gemma3, GEMMA_LAYER_TENSORS),
    "phi3": Architecture("phi3", False, _phi3, {"ffn_up": "mlp.gate_up_proj"}, partial_rotary=True),
}

# Token ids after which llama.cpp stops generating; all count as end of sequence.
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def architecture(index: GGUFIndex, path: Path) -> Architecture:
    arch = index.meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def read_config(index: GGUFIndex, path: Path) -> ModelConfig:
    """Model shape from ``{arch}.*`` and ``tokenizer.ggml.*`` metadata (and a few small tensors)."""
    arch = index.meta.get("general.architecture")
    family = architecture(index, path)

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        full = f"{arch}.{key}" if not key.startswith(("general.", "tokenizer.")) else key
        if full not in index.meta:
            if default is _REQUIRED:
                raise ModelLoadError(f"{path}: missing metadata key {full}")
            return default
        return index.meta[full]

    tensors = {t.name: t for t in index.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ModelLoadError(f"{path}: missing tensor token_embd.weight")
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    base: dict[str, Any] = dict(
        vocab_size=int(embed.shape[-1]),  # GGUF lists dims fastest-first: [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta),
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if (bos := meta("tokenizer.ggml.bos_token_id", None)) is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(meta(key)) for key in EOS_KEYS if key in index.meta)),
        family=family.family,
    )
    if not family.partial_rotary and int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embedding in a {arch!r} file is not supported")
    try:
        return ModelConfig(**{**base, **family.switches(meta, index, base)})
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _rope_scaling(meta: Meta) -> dict[str, Any] | None:
    """HF-style ``rope_scaling`` dict from ``{arch}.rope.scaling.*`` keys (linear, YaRN)."""
    kind = meta("rope.scaling.type", None)
    factor = meta("rope.scaling.factor", None)
    if kind is None and meta("rope.scale_linear", None) is not None:  # older files
        kind, factor = "linear", meta("rope.scale_linear")
    if kind in (None, "none") or factor is None or float(factor) == 1.0:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = meta("rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling
