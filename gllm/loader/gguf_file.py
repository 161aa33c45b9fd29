"""Load a llama.cpp GGUF file: metadata becomes a `ModelConfig`, tensors become dequantized HF-named weights.

What each architecture's names and metadata mean is in `gllm.loader.gguf_config`. Named ``gguf_file`` so
that it does not shadow the ``gguf`` package it reads with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from gllm.config import ModelConfig
from gllm.loader import LoadedModel, ModelLoadError, cache, check_shape, weight_shapes
from gllm.loader.gguf_config import Architecture, architecture, read_config
from gllm.loader.gguf_index import GGUFIndex, TensorEntry
from gllm.ops.linear import BLOCK_TYPES, BlockWeight, block_products_supported
from gllm.tokenizer import Tokenizer



def load_gguf(path: Path, dtype: torch.dtype, name: str | None = None, blocks: bool = False) -> LoadedModel:
    """Read config, weights and (when the file has one) tokenizer from one GGUF file; with ``blocks``,
    also the raw blocks of the matrices this CPU can multiply from (in bfloat16).

    The file's index and tokenizer are cached after the first load (`gllm.loader.cache`).
    """
    key = cache.file_key(path)
    index = _index(path, key)
    config = read_config(index, path)
    weights, kept = _read_weights(index, architecture(index, path), config, path, dtype, blocks)
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
    index: GGUFIndex, arch: Architecture, config: ModelConfig, path: Path, dtype: torch.dtype, with_blocks: bool
) -> tuple[dict[str, torch.Tensor], dict[str, BlockWeight]]:
    """Every weight dequantized to ``dtype``; and, ``with_blocks`` in bfloat16 on a CPU that can multiply
    from them, the raw blocks of the matrices stored in a block type it reads (``BLOCK_TYPES``), rows in
    the same order as the dequantized weights."""
    by_hf_name = {hf: t for t in index.tensors if (hf := arch.hf_name(t.name)) is not None}
    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockWeight] = {}
    keep_blocks = with_blocks and dtype == torch.bfloat16 and block_products_supported()
    shapes = weight_shapes(config)
    for name, shape in tqdm(shapes.items(), desc="loading weights", unit="tensor", disable=None):
        tensor = by_hf_name.get(name)
        if tensor is None:
            raise ModelLoadError(f"{path}: missing tensor {name} ({arch.gguf_name(name)} in GGUF)")
        check_shape(path, f"{tensor.name} ({name})", tuple(int(d) for d in reversed(tensor.shape)), shape)
        weight = _dequantize(index, tensor, path)
        kind = tensor.tensor_type.name
        raw = None
        if keep_blocks and kind in BLOCK_TYPES and len(shape) == 2:
            raw = torch.from_numpy(np.array(index.data(tensor))).view(shape[0], shape[1] // 32, BLOCK_TYPES[kind][1])
        if arch.permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
            weight = unpermute_qk(weight, heads)
            raw = None if raw is None else unpermute_qk(raw.reshape(shape[0], -1), heads).view(raw.shape)
        weights[name] = weight.to(dtype)
        if raw is not None:
            blocks[name] = BlockWeight(kind, raw)
    return weights, blocks


def _dequantize(index: GGUFIndex, tensor: TensorEntry, path: Path) -> torch.Tensor:
    try:
        array = dequantize(index.data(tensor), tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}") from exc
    if not array.flags.writeable:  # F32 comes back as a read-only view of the memory-mapped file
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
