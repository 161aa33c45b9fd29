"""A Hugging Face ``config.json`` as a `ModelConfig`: which family it is and what that family switches on.

The dictionary is first read by ``transformers``' own config class for its ``model_type``: that fills
the defaults each family's checkpoints leave out, turns older key spellings (``rope_scaling``,
``rope_theta``, ``use_sliding_window``) into today's (``rope_parameters``, ``layer_types``) and checks the
values. Multimodal checkpoints (Gemma 3 4B and up, Ministral 3) are read through their ``text_config``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import transformers

from gllm.config import ModelConfig

# model_type -> what it changes over the Llama defaults, given the transformers config
FamilyReader = Callable[[Any], dict[str, Any]]


def _plain(text: Any) -> dict[str, Any]:
    return {}


def _qwen2(text: Any) -> dict[str, Any]:
    return {"qkv_bias": True}


def _qwen3(text: Any) -> dict[str, Any]:
    if getattr(text, "attention_bias", False):
        raise ValueError("Qwen3 models with attention_bias are not supported")
    return {"qk_norm": True}


def _gemma(text: Any) -> dict[str, Any]:
    """What Gemma 2 and 3 share: (1 + w) norms around both sub-layers, GeGLU, scaled embeddings."""
    return {
        "norm_offset": 1.0,
        "sandwich_norms": True,
        "hidden_act": _activation(text.hidden_activation),
        "embedding_multiplier": math.sqrt(text.hidden_size),
        "query_pre_attn_scalar": float(text.query_pre_attn_scalar),
        "attn_logit_softcap": getattr(text, "attn_logit_softcapping", None),
        "final_logit_softcap": getattr(text, "final_logit_softcapping", None),
    }


def _gemma3(text: Any) -> dict[str, Any]:
    local = text.rope_parameters.get("sliding_attention") or {}
    return {**_gemma(text), "qk_norm": True, "local_rope_theta": local.get("rope_theta")}


def _phi3(text: Any) -> dict[str, Any]:
    partial = text.rope_parameters.get("partial_rotary_factor", 1.0)
    rotary = int(_head_dim(text) * partial)
    return {"fused_checkpoint": True, "rotary_dim": None if rotary == _head_dim(text) else rotary}


def _smollm3(text: Any) -> dict[str, Any]:
    return {"nope_layers": tuple(i for i, use in enumerate(text.no_rope_layers) if not use)}


FAMILIES: dict[str, FamilyReader] = {
    "llama": _plain,
    "mistral": _plain,
    "ministral": _plain,
    "ministral3": _plain,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma,
    "gemma3_text": _gemma3,
    "phi3": _phi3,
    "smollm3": _smollm3,
}


def _activation(name: str) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise ValueError(f"unsupported activation {name!r}")


def _head_dim(text: Any) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _rope(text: Any) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling of the (global) layers; None for plain RoPE."""
    params = dict(text.rope_parameters or {})
    params = dict(params.get("full_attention", params))  # Gemma 3 keys them by layer type
    theta = float(params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    params["rope_type"] = kind
    if kind == "longrope":
        params.setdefault("original_max_position_embeddings", getattr(text, "original_max_position_embeddings", None))
        if params.get("factor") is None:  # Phi-3: the ratio of the two context lengths
            params["factor"] = text.max_position_embeddings / params["original_max_position_embeddings"]
    return theta, params


def _local_layers(text: Any) -> tuple[int | None, tuple[int, ...]]:
    """The sliding window and the layers that use it (``layer_types``; all layers when a family has none).
    A window as long as the context (Phi-3.5-mini's 262,144) is none."""
    window = getattr(text, "sliding_window", None)
    if not window or window >= text.max_position_embeddings:
        return None, ()
    types = getattr(text, "layer_types", None)
    if types is None:
        return window, tuple(range(text.num_hidden_layers))
    local = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    return (window, local) if local else (None, ())


def _ids(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (() if value is None else (value,))


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Read a ``config.json`` dictionary; ``ValueError`` (or ``KeyError``) for what gLLM cannot run."""
    model_type = raw.get("model_type", "llama")
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        hf = transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        if "Unrecognized model" in str(exc):
            raise ValueError(f"unknown model_type {model_type!r}") from exc
        raise
    text = getattr(hf, "text_config", None) or hf
    family = text.model_type
    if family not in FAMILIES:
        raise ValueError(f"unsupported model family {family!r} (supported: {', '.join(sorted(FAMILIES))})")
    if family == "llama" and (getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False)):
        raise ValueError("Llama models with attention_bias or mlp_bias are not supported")
    switches = FAMILIES[family](text)
    switches.setdefault("hidden_act", _activation(getattr(text, "hidden_act", "silu")))
    theta, scaling = _rope(text)
    window, local = _local_layers(text)
    heads = text.num_attention_heads
    return ModelConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=_head_dim(text),
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        bos_token_id=raw.get("bos_token_id", getattr(text, "bos_token_id", None)),
        eos_token_ids=_ids(raw.get("eos_token_id", getattr(text, "eos_token_id", None))),
        family=family,
        sliding_window=window,
        local_layers=local,
        **switches,
    )
