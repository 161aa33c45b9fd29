"""Read LoRA adapter files: a PEFT folder or a llama.cpp GGUF LoRA file, into one neutral form.

Both formats come out as ``LoraTensors``: for every adapted projection (Hugging Face module name, e.g.
``model.layers.3.self_attn.q_proj``) its ``A`` ``[r, in]``, ``B`` ``[out, r]`` and scale, so that the
update is ``scale * x @ A.T @ B.T``. Whether the shapes fit a model is checked later, against its config
(``gllm.lora.adapter``), since neither format says reliably which base model it was trained on.

* PEFT: ``adapter_config.json`` (``r``, ``lora_alpha``, ``alpha_pattern``, ``use_rslora``, ...) and
  ``adapter_model.safetensors``; scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Pickled
  ``adapter_model.bin`` files are refused: loading them could run code.
* GGUF (llama.cpp's ``convert_lora_to_gguf.py``): ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha``, tensors ``blk.N.<base tensor>.weight.lora_a`` / ``.lora_b``; scale
  ``alpha / r`` (1 when alpha is 0, as llama.cpp reads it). The converter permutes the rows of Q and K
  projections like their base weights, so ``B`` of those is put back in Hugging Face order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open

from gllm.config import ModelConfig
from gllm.loader import ModelLoadError
from gllm.loader.gguf_config import ARCHITECTURES
from gllm.loader.gguf_file import unpermute_qk
from gllm.loader.hf import _read_json as read_json_object

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# The projections an adapter may change, by their Hugging Face names.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT options that change what an adapter computes beyond plain LoRA; an adapter that sets one is refused.
UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "alora_invocation_tokens", "layer_replication",
                       "trainable_token_indices", "target_parameters", "use_qalora", "use_bdlora")  # fmt: skip


class AdapterError(ValueError):
    """An adapter could not be read or does not fit the model; the message names the file and the fault."""


@dataclass
class LoraPair:
    """One projection's low-rank update: ``scale * x @ a.T @ b.T``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraTensors:
    """An adapter as read from its files, before it is fitted to a model."""

    source: str
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # by Hugging Face module name


def read_adapter(path: str | Path, config: ModelConfig) -> LoraTensors:
    """Read a PEFT folder or a ``.gguf`` LoRA file; ``config`` is needed to undo llama.cpp's Q/K row order."""
    path = Path(path)
    if path.is_dir():
        return read_peft(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return read_gguf_lora(path, config)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or folder")
    raise AdapterError(f"{path}: expected a PEFT adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) or a .gguf LoRA file")


def read_peft(folder: Path) -> LoraTensors:
    """A PEFT LoRA folder; every unsupported option is refused by name rather than ignored."""
    cfg = _peft_config(folder)
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle, which gLLM never loads)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{folder}: no {PEFT_WEIGHTS}{extra}")
    try:
        with safe_open(weights, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file: {exc}") from exc
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", name)
        if match is None:
            raise AdapterError(f"{weights}: tensor {name} is not a LoRA A or B matrix (only LoRA is supported)")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    out = LoraTensors(str(folder))
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        rank = ab["A"].shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        root = math.sqrt(rank) if cfg.get("use_rslora") else rank
        out.pairs[module] = LoraPair(ab["A"].float(), ab["B"].float(), float(alpha) / root)
    if not out.pairs:
        raise AdapterError(f"{weights}: no LoRA tensors")
    return out


def _peft_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder}: no {PEFT_CONFIG}; not a PEFT adapter folder")
    try:
        cfg = read_json_object(path)
    except ModelLoadError as exc:  # the same checks as a model's config.json
        raise AdapterError(str(exc)) from exc
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r}; only LORA adapters are supported")
    named = [f"{k}={cfg[k]!r}" for k in UNSUPPORTED_OPTIONS if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        named.append(f"bias={cfg['bias']!r}")
    if named:
        raise AdapterError(f"{path}: unsupported LoRA options {', '.join(named)} (plain LoRA on linear layers only)")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: a key matches a module whose name ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_gguf_lora(path: Path, config: ModelConfig) -> LoraTensors:
    """A llama.cpp LoRA adapter (``convert_lora_to_gguf.py``'s output)."""
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # numpy errors on truncated data, ValueError on bad magic
        raise AdapterError(f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}") from exc
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterError(f"{path}: not a LoRA adapter (general.type {meta.get('general.type')!r}, "
                           f"adapter.type {meta.get('adapter.type')!r}); a model file goes in --model")  # fmt: skip
    arch = ARCHITECTURES.get(meta.get("general.architecture"))
    if arch is None or arch.family != config.family:
        raise AdapterError(f"{path}: adapter for architecture {meta.get('general.architecture')!r}; "
                           f"this model is a {config.family!r} model")  # fmt: skip
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, half = t.name.rpartition(".lora_")
        module = (arch.hf_name(base) or "").removesuffix(".weight")
        if half not in ("a", "b") or not module.endswith(TARGETS):
            raise AdapterError(f"{path}: tensor {t.name} is not a LoRA matrix of {', '.join(TARGETS)}")
        array = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        halves.setdefault(module, {})[half] = torch.from_numpy(array.reshape(shape))
    out = LoraTensors(str(path))
    for module, ab in halves.items():
        if set(ab) != {"a", "b"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_a and lora_b")
        a, b = ab["a"], ab["b"]
        if arch.permuted and module.endswith(("q_proj", "k_proj")):
            heads = config.num_heads if module.endswith("q_proj") else config.num_kv_heads
            b = _unpermute_rows(b, heads, path, module)
        rank = a.shape[0]
        out.pairs[module] = LoraPair(a, b, alpha / rank if alpha else 1.0)
    if not out.pairs:
        raise AdapterError(f"{path}: no LoRA tensors")
    return out


def _unpermute_rows(b: torch.Tensor, heads: int, path: Path, module: str) -> torch.Tensor:
    if b.ndim != 2 or b.shape[0] % (2 * heads):
        raise AdapterError(f"{path}: {module} lora_b has shape {tuple(b.shape)}, which {heads} heads cannot split")
    return unpermute_qk(b, heads)
