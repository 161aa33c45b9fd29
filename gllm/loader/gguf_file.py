"""Load a llama.cpp GGUF file: metadata becomes a `ModelConfig`, tensors become HF-named weights.

Matrices stored in a block type the CPU kernels read (``gllm.ops.block_linear``) can stay in their blocks,
mapped from the file: no copy is made and nothing is dequantized, so a loaded model takes about its
file's size in memory. Everything else is dequantized. Named ``gguf_file`` so that it does not shadow the
``gguf`` package it reads with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from gllm.config import ModelConfig
from gllm.loader import LoadedModel, ModelLoadError, cache, check_shape, weight_shapes
from gllm.loader.gguf_index import GGUFIndex, TensorEntry
from gllm.ops import block_linear
from gllm.ops.block_linear import BlockWeight
from gllm.tokenizer import Tokenizer

ARCHITECTURE = "llama"

# GGUF tensor name stem -> Hugging Face name stem; per-layer ones sit under blk.N. / model.layers.N.
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Token ids after which llama.cpp stops generating; all count as end of sequence.
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

_REQUIRED = object()


def load_gguf(path: Path, dtype: torch.dtype, name: str | None = None, blocks: bool = False) -> LoadedModel:
    """Read config, weights and (when the file has one) tokenizer from one GGUF file; with ``blocks``,
    the matrices this CPU can multiply from stay in their blocks (``LoadedModel.blocks``), and only the
    rest is dequantized into ``LoadedModel.weights``.

    The file's index and tokenizer are cached after the first load (`gllm.loader.cache`).
    """
    key = cache.file_key(path)
    index = _index(path, key)
    config = read_config(index, path)
    weights, kept = _read_weights(index, config, path, dtype, blocks)
    tokenizer = _tokenizer(path, key) if "tokenizer.ggml.model" in index.meta else None
    return LoadedModel(name=name or path.stem, config=config, weights=weights, tokenizer=tokenizer, blocks=kept)


def _index(path: Path, key: str) -> GGUFIndex:
    """The file's index from the cache, or parsed with `gguf.GGUFReader` and then cached."""
    cached = cache.read_json(f"gguf-{key}.json")
    if cached is not None:
        try:
            return GGUFIndex.from_json(cached, path)
        except (KeyError, TypeError, ValueError):
            pass  # an entry from another version of this code: read the file again
    index = GGUFIndex.from_reader(open_gguf(path), path)
    cache.write_json(f"gguf-{key}.json", index.to_json())
    return index


def _tokenizer(path: Path, key: str) -> Tokenizer | None:
    """The file's tokenizer, converted by `transformers` on the first load and saved in the cache."""
    name = f"tokenizer-{key}"
    folder = cache.folder_entry(name)
    if folder is not None:
        try:
            cached = Tokenizer.from_folder(folder)
            if cached is not None:
                return cached
        except Exception:  # a damaged entry: convert again from the file
            pass
    try:
        tokenizer = Tokenizer.from_folder(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot convert
        raise ModelLoadError(f"{path}: cannot load its tokenizer: {exc}") from exc
    if tokenizer is not None:
        cache.write_folder(name, tokenizer.hf.save_pretrained)
    return tokenizer


def open_gguf(path: Path) -> GGUFReader:
    """A reader over ``path``, or a `ModelLoadError` for a file that is not a whole GGUF file."""
    try:
        return GGUFReader(path)
    except Exception as exc:  # numpy reshape/index errors on truncated data, ValueError on bad magic
        raise ModelLoadError(f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor, or None for tensors gLLM does not use."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    return None


def read_config(index: GGUFIndex, path: Path) -> ModelConfig:
    """Model shape from ``llama.*`` and ``tokenizer.ggml.*`` metadata."""

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        if key not in index.meta:
            if default is _REQUIRED:
                raise ModelLoadError(f"{path}: missing metadata key {key}")
            return default
        return index.meta[key]

    arch = meta("general.architecture")
    if arch != ARCHITECTURE:
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r}; only {ARCHITECTURE!r} is supported")
    tensors = {t.name: t for t in index.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(
            f"{path}: per-dimension RoPE factors (rope_freqs.weight, Llama 3.1 style) are not supported"
        )
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ModelLoadError(f"{path}: missing tensor token_embd.weight")
    hidden = int(meta("llama.embedding_length"))
    heads = int(meta("llama.attention.head_count"))
    head_dim = int(meta("llama.attention.key_length", hidden // heads))
    rotary_dim = int(meta("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embedding ({rotary_dim} of {head_dim} dims) is not supported")
    eos_ids = tuple(dict.fromkeys(int(meta(key)) for key in EOS_KEYS if key in index.meta))
    bos = meta("tokenizer.ggml.bos_token_id", None)
    try:
        return ModelConfig(
            vocab_size=int(embed.shape[-1]),  # GGUF lists dims fastest-first: [hidden, vocab]
            hidden_size=hidden,
            intermediate_size=int(meta("llama.feed_forward_length")),
            num_layers=int(meta("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(meta("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(meta),
            max_position_embeddings=int(meta("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _rope_scaling(meta: Callable[..., Any]) -> dict[str, Any] | None:
    """HF-style ``rope_scaling`` dict from ``llama.rope.scaling.*`` keys."""
    kind = meta("llama.rope.scaling.type", None)
    factor = meta("llama.rope.scaling.factor", None)
    if kind is None and meta("llama.rope.scale_linear", None) is not None:  # older files
        kind, factor = "linear", meta("llama.rope.scale_linear")
    if kind in (None, "none") or factor is None or float(factor) == 1.0:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = meta("llama.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for a Q or K projection (``num_heads`` = KV heads for K).

    Hugging Face stores each head's rows as [first rotary half, second rotary half]; llama.cpp's
    converter interleaves them (row pairs (0, d/2), (1, d/2+1), ...) to suit its rotate-adjacent-pairs
    RoPE. Viewing a head's rows as (d/2, 2) and transposing to (2, d/2) restores HF order.
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_weights(
    index: GGUFIndex, config: ModelConfig, path: Path, dtype: torch.dtype, with_blocks: bool
) -> tuple[dict[str, torch.Tensor], dict[str, BlockWeight]]:
    """Every weight dequantized to ``dtype``, except, ``with_blocks``, the matrices in a block type the
    kernels read: those come as blocks, rows in the same order as the dequantized weights would be."""
    by_hf_name = {hf: t for t in index.tensors if (hf := hf_tensor_name(t.name)) is not None}
    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockWeight] = {}
    keep_blocks = with_blocks and block_linear.available()
    for name, shape in tqdm(weight_shapes(config).items(), desc="loading weights", unit="tensor", disable=None):
        tensor = by_hf_name.get(name)
        if tensor is None:
            raise ModelLoadError(f"{path}: missing tensor {name} ({_gguf_name(name)} in GGUF)")
        check_shape(path, f"{tensor.name} ({name})", tuple(int(d) for d in reversed(tensor.shape)), shape)
        heads = None
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
        kind = tensor.tensor_type.name
        if keep_blocks and len(shape) == 2 and block_linear.kernel_type(kind):
            blocks[name] = BlockWeight(kind, _block_rows(index, tensor, heads))
            continue
        weight = _dequantize(index, tensor, path)
        weights[name] = (weight if heads is None else unpermute_qk(weight, heads)).to(dtype)
    return weights, blocks


def _block_rows(index: GGUFIndex, tensor: TensorEntry, heads: int | None) -> torch.Tensor:
    """The tensor's blocks ``[rows, row bytes]``: a view of the mapped file, or for Q and K (whose rows
    are reordered, ``unpermute_qk``) a copy read from the file without mapping its pages."""
    if heads is None:
        return torch.from_numpy(index.data(tensor))
    return unpermute_qk(torch.from_numpy(index.read(tensor)), heads)


def _dequantize(index: GGUFIndex, tensor: TensorEntry, path: Path) -> torch.Tensor:
    try:
        array = dequantize(index.data(tensor), tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}") from exc
    if not array.flags.writeable:  # F32 comes back as a read-only view of the memory-mapped file
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _gguf_name(hf_name: str) -> str:
    """Inverse of `hf_tensor_name`, for naming a missing tensor the way the file would."""
    stem, _, suffix = hf_name.rpartition(".")
    for gguf_stem, hf_stem in GLOBAL_TENSORS.items():
        if stem == hf_stem:
            return f"{gguf_stem}.{suffix}"
    _, _, layer, layer_stem = stem.split(".", 3)
    gguf_stem = next(g for g, h in LAYER_TENSORS.items() if h == layer_stem)
    return f"blk.{layer}.{gguf_stem}.{suffix}"
