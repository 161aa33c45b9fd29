"""Model loading: a registered name, a Hugging Face folder or a GGUF file become one `LoadedModel`.

Whatever the source, weights come out under Hugging Face Llama names, in the layout `transformers` uses,
so the model code has a single format to read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gllm.config import ModelConfig
from gllm.tokenizer import Tokenizer


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the file or name and what is wrong with it."""


@dataclass
class LoadedModel:
    """Everything the engine needs from a checkpoint."""

    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face Llama names; lm_head.weight absent when tied
    tokenizer: Tokenizer | None  # None when a folder ships weights only
    # GGUF matrices stored in llama.cpp blocks the CPU can multiply from (gllm.ops.linear.BlockWeight),
    # by the same names as ``weights``; empty for other sources
    blocks: dict[str, Any] = field(default_factory=dict)


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a model with ``config`` needs, as its family's Hugging Face
    checkpoints name and lay them out (Phi-3 fuses Q/K/V and gate/up; Qwen2 adds Q/K/V biases; Gemma
    norms both sub-layers' outputs; Qwen3 and Gemma 3 norm query and key heads)."""
    hidden, ffn, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        if config.fused_checkpoint:
            shapes[p + "self_attn.qkv_proj.weight"] = (q_rows + 2 * kv_rows, hidden)
        else:
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                shapes[p + f"self_attn.{name}_proj.weight"] = (rows, hidden)
                if config.qkv_bias:
                    shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_rows)
        if config.fused_checkpoint:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * ffn, hidden)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (ffn, hidden)
            shapes[p + "mlp.up_proj.weight"] = (ffn, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, ffn)
        for norm in config.layer_norms():
            shapes[p + norm + ".weight"] = (head_dim,) if norm.startswith("self_attn.") else (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_shape(source: str | os.PathLike[str], name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """Fail with both shapes named: a mismatch here means the config and the weights disagree."""
    if tuple(got) != tuple(want):
        raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(got)}, expected {tuple(want)}")


def load_model(model: str | os.PathLike[str], dtype: torch.dtype = torch.float32, blocks: bool = False) -> LoadedModel:
    """Load a registered model name, a Hugging Face Llama folder or a ``.gguf`` file.

    Weights are converted to ``dtype`` (GGUF quantized tensors are dequantized first). With ``blocks``,
    a GGUF file's block-quantized matrices are also kept as they are, where this CPU can multiply from
    them (``LoadedModel.blocks``).
    """
    # Imported here because these modules import ModelLoadError and weight_shapes from this one.
    from gllm.loader import gguf_file, hf, registry

    if isinstance(model, str) and registry.is_registered(model):  # a name means the same in every folder
        return gguf_file.load_gguf(registry.resolve(model), dtype, name=model, blocks=blocks)
    path = Path(model)
    if not path.exists():
        if isinstance(model, str) and path.name == model and path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"unknown model {model!r}; known names: {', '.join(registry.known_models())}")
        raise ModelLoadError(f"{model}: no such file or folder")
    if path.is_dir():
        return hf.load_hf_folder(path, dtype)
    if path.suffix.lower() == ".gguf":
        return gguf_file.load_gguf(path, dtype, blocks=blocks)
    raise ModelLoadError(f"{path}: expected a Hugging Face model folder or a .gguf file")
