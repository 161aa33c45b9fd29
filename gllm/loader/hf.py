"""Load a Hugging Face Llama folder: ``config.json`` plus one or several ``.safetensors`` files."""

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
    weights = _read_weights(folder, weight_shapes(config), dtype)
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


def _files_by_tensor(folder: Path, names: list[str]) -> dict[str, Path]:
    """Which safetensors file holds each expected tensor."""
    if (folder / SINGLE_FILE).is_file():
        return {name: folder / SINGLE_FILE for name in names}
    index_path = folder / SHARD_INDEX
    if not index_path.is_file():
        raise ModelLoadError(f"{folder}: no {SINGLE_FILE} or {SHARD_INDEX}; only safetensors weights are supported")
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index_path}: no 'weight_map' object")
    for name in names:
        if name not in weight_map:
            raise ModelLoadError(f"{index_path}: missing tensor {name}")
    return {name: folder / weight_map[name] for name in names}


def _read_weights(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, path in _files_by_tensor(folder, list(shapes)).items():
        by_file[path].append(name)
    weights: dict[str, torch.Tensor] = {}
    with tqdm(total=len(shapes), desc="loading weights", unit="tensor", disable=None) as bar:
        for path, names in by_file.items():
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard listed in {SHARD_INDEX} does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise ModelLoadError(f"{path}: missing tensor {name}")
                        check_shape(path, name, tuple(f.get_slice(name).get_shape()), shapes[name])
                        weights[name] = f.get_tensor(name).to(dtype)
                        bar.update()
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
    return weights
