"""Load a Hugging Face model folder: ``config.json`` plus one or several ``.safetensors`` files.

Multimodal checkpoints (Gemma 3 4B and up, Ministral 3) keep their language model's tensors under
``language_model.`` (or ``model.language_model.``); those are read under the plain names, the rest is
left alone. Gemma's norms multiply by ``1 + weight``: the 1 is added here, so that every source hands the
model the factor itself (Gemma's GGUF files already hold it).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from gllm.config import ModelConfig
from gllm.loader import LoadedModel, ModelLoadError, check_shape, weight_shapes
from gllm.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def load_hf_folder(folder: Path, dtype: torch.dtype) -> LoadedModel:
    """Read config, weights (validated name by name, shape by shape) and tokenizer from ``folder``."""
    config = read_config(folder)
    weights = _read_weights(folder, weight_shapes(config), dtype, config.norm_offset)
    try:
        tokenizer = Tokenizer.from_folder(folder)
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise ModelLoadError(f"{folder}: cannot load tokenizer: {exc}") from exc
    return LoadedModel(name=folder.resolve().name, config=config, weights=weights, tokenizer=tokenizer)


def read_config(folder: Path) -> ModelConfig:
    """The folder's ``config.json``, plus the eos ids of its ``generation_config.json``.

    Chat models often list their end-of-turn token only in the latter.
    """
    raw = _read_json(folder / "config.json")
    try:
        config = ModelConfig.from_hf_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: {_describe(exc)}") from exc
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent}: no {path.name}; not a Hugging Face model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _describe(exc: Exception) -> str:
    return f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)


# Where a multimodal checkpoint keeps its language model, tried in turn for names under ``model.`` and
# for ``lm_head``.
MODEL_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
HEAD_PREFIXES = ("lm_head.", "language_model.lm_head.")


def _stored_names(folder: Path) -> dict[str, Path]:
    """Every tensor name in the folder's safetensors and the file holding it."""
    if (folder / SINGLE_FILE).is_file():
        try:
            with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                return dict.fromkeys(f.keys(), folder / SINGLE_FILE)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{folder / SINGLE_FILE}: unreadable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
    index_path = folder / SHARD_INDEX
    if not index_path.is_file():
        raise ModelLoadError(f"{folder}: no {SINGLE_FILE} or {SHARD_INDEX}; only safetensors weights are supported")
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index_path}: no 'weight_map' object")
    return {name: folder / file for name, file in weight_map.items()}


def _stored_name(name: str, stored: dict[str, Path]) -> str:
    """The name ``name`` has in this checkpoint (itself, or under a multimodal model's prefix)."""
    stem, prefixes = ("model.", MODEL_PREFIXES) if name.startswith("model.") else ("lm_head.", HEAD_PREFIXES)
    for prefix in prefixes:
        candidate = prefix + name[len(stem) :]
        if candidate in stored:
            return candidate
    return name


def _read_weights(
    folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, norm_offset: float
) -> dict[str, torch.Tensor]:
    stored = _stored_names(folder)
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for name in shapes:
        key = _stored_name(name, stored)
        if key not in stored:
            where = folder / SINGLE_FILE if (folder / SINGLE_FILE).is_file() else folder / SHARD_INDEX
            raise ModelLoadError(f"{where}: missing tensor {name}")
        by_file[stored[key]].append((name, key))
    weights: dict[str, torch.Tensor] = {}
    with tqdm(total=len(shapes), desc="loading weights", unit="tensor", disable=None) as bar:
        for path, names in by_file.items():
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard listed in {SHARD_INDEX} does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    present = set(f.keys())
                    for name, key in names:
                        if key not in present:
                            raise ModelLoadError(f"{path}: missing tensor {key}")
                        check_shape(path, key, tuple(f.get_slice(key).get_shape()), shapes[name])
                        tensor = f.get_tensor(key)
                        if norm_offset and name.endswith("norm.weight"):  # in float32, as the reference does
                            tensor = tensor.float() + norm_offset
                        weights[name] = tensor.to(dtype)
                        bar.update()
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
    return weights
