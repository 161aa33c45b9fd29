"""The saved-state format: a conversation's KV blocks with its token ids and the identity of the model.

A state is a safetensors file (so no code ever runs on load, and any safetensors reader can open it):

* tensor ``token_ids``: int32 ``[n]``, the tokens of the saved blocks (``n`` a multiple of the block size);
* tensor ``kv``: ``[layers, 2, n / block_size, block_size, kv_heads, head_dim]`` in the engine's dtype, keys
  then values of each layer (``gllm.kv.transfer``);
* metadata (strings): ``format`` = ``gllm-kv-state``, ``version`` = ``1``, ``fingerprint`` (below),
  ``model``, ``dtype``, ``block_size``, ``tokens``, and ``crc32`` of the two tensors' bytes, so a damaged
  state is refused rather than restored into wrong attention; for K/V computed under a LoRA adapter also
  ``adapter`` (its name) and ``adapter_fingerprint`` (``gllm.lora.adapter.adapter_fingerprint``), without
  which a state is the base model's.

The fingerprint says which model computed the K/V: the architecture (every ``ModelConfig`` field), the
dtype, the block size, the weight-only quantization, whether products read the GGUF blocks, and a sample
of the weights (64 evenly spaced values of every tensor, or bytes of a matrix kept in blocks, with its
name and shape). Sampling keeps it cheap at start-up (a few milliseconds, where
hashing every weight would read gigabytes) while another checkpoint of the same shape, a fine-tune
included, still changes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import safetensors.torch
import torch

from gllm.config import ModelConfig
from gllm.ops.block_linear import BlockWeight

FORMAT = "gllm-kv-state"
VERSION = 1
SAMPLES_PER_TENSOR = 64
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StateError(ValueError):
    """A state this engine cannot restore: damaged, not a state, another format version or another model."""


def model_fingerprint(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                      block_size: int, quantize: str | None, blocks: dict[str, BlockWeight] | None = None) -> str:
    """A short hex digest of what decides the K/V values a prompt gets (see the module docstring)."""
    digest = hashlib.blake2b(digest_size=16)
    described = {**dataclasses.asdict(config), "dtype": str(dtype), "block_size": block_size, "quantize": quantize,
                 "blocks": bool(blocks)}
    weights = {**weights, **{name: block.blocks for name, block in (blocks or {}).items()}}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        flat = weights[name].detach().reshape(-1)
        count = min(flat.numel(), SAMPLES_PER_TENSOR)
        index = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)  # evenly spaced, both ends
        digest.update(f"{name}{tuple(weights[name].shape)}".encode())
        digest.update(flat[index].float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class StateAdapter:
    """The LoRA adapter a state's K/V was computed under: its name and fingerprint."""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class SavedState:
    token_ids: list[int]
    kv: torch.Tensor  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    adapter: StateAdapter | None = None


@dataclass(frozen=True)
class StateFormat:
    """What one engine writes into its states and requires of the states it restores."""

    model: str
    fingerprint: str
    dtype: torch.dtype
    block_size: int
    kv_shape: tuple[int, int, int]  # layers, kv_heads, head_dim
    vocab_size: int

    def bytes_for(self, num_blocks: int) -> int:
        """The size of the KV data of ``num_blocks`` blocks (the state is that plus a few hundred bytes)."""
        layers, heads, dim = self.kv_shape
        return 2 * layers * num_blocks * self.block_size * heads * dim * torch.empty((), dtype=self.dtype).element_size()

    def encode(self, token_ids: list[int], kv: torch.Tensor, adapter: StateAdapter | None = None) -> bytes:
        tokens = torch.tensor(token_ids, dtype=torch.int32)
        kv = kv.contiguous()
        meta = {"format": FORMAT, "version": str(VERSION), "fingerprint": self.fingerprint, "model": self.model,
                "dtype": _name(self.dtype), "block_size": str(self.block_size), "tokens": str(len(token_ids)),
                "crc32": _crc32(tokens, kv)}
        if adapter is not None:
            meta.update(adapter=adapter.name, adapter_fingerprint=adapter.fingerprint)
        return safetensors.torch.save({"token_ids": tokens, "kv": kv}, metadata=meta)

    def decode(self, state: bytes) -> SavedState:
        """Parse and check a state; raises ``StateError`` saying what is wrong, before anything changes."""
        meta = _metadata(state)
        if meta.get("format") != FORMAT:
            raise StateError("this is not a gLLM KV state (its metadata has no format 'gllm-kv-state')")
        if meta.get("version") != str(VERSION):
            raise StateError(f"the state has format version {meta.get('version')!r}; this runtime reads version "
                             f"{VERSION}")
        if meta.get("fingerprint") != self.fingerprint:
            raise StateError(
                f"the state was saved by another model (model {meta.get('model')!r}, dtype {meta.get('dtype')}, "
                f"block size {meta.get('block_size')}, fingerprint {meta.get('fingerprint')}); this runtime runs "
                f"{self.model!r}, dtype {_name(self.dtype)}, block size {self.block_size}, fingerprint "
                f"{self.fingerprint}")
        try:
            tensors = safetensors.torch.load(state)
        except Exception as exc:  # SafetensorError: truncated or inconsistent
            raise StateError(f"the state is damaged or truncated: {exc}") from None
        tokens, kv = tensors.get("token_ids"), tensors.get("kv")
        if tokens is None or kv is None or set(tensors) != {"token_ids", "kv"}:
            raise StateError("the state is damaged: it needs exactly the tensors 'token_ids' and 'kv'")
        layers, heads, dim = self.kv_shape
        blocks = len(tokens) // self.block_size
        shape = (layers, 2, blocks, self.block_size, heads, dim)
        if tokens.dtype != torch.int32 or tokens.dim() != 1 or len(tokens) % self.block_size:
            raise StateError("the state is damaged: 'token_ids' must be int32 whole blocks")
        if kv.dtype != self.dtype or tuple(kv.shape) != shape or meta.get("tokens") != str(len(tokens)):
            raise StateError(f"the state is damaged: 'kv' is {kv.dtype} {tuple(kv.shape)}, expected {self.dtype} {shape}")
        if meta.get("crc32") != _crc32(tokens, kv):
            raise StateError("the state is damaged: its checksum does not match its contents")
        ids = tokens.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise StateError("the state is damaged: it has token ids outside the vocabulary")
        adapter = None
        if "adapter" in meta or "adapter_fingerprint" in meta:
            name, fingerprint = meta.get("adapter"), meta.get("adapter_fingerprint")
            if not isinstance(name, str) or not isinstance(fingerprint, str):
                raise StateError("the state is damaged: it names a LoRA adapter without both its name and fingerprint")
            adapter = StateAdapter(name, fingerprint)
        return SavedState(ids, kv, adapter)


def _metadata(state: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (an 8-byte little-endian length, then JSON)."""
    if not isinstance(state, (bytes, bytearray, memoryview)) or len(state) < 8:
        raise StateError("this is not a gLLM KV state (too short to be a safetensors file)")
    (length,) = struct.unpack("<Q", bytes(state[:8]))
    if length > len(state) - 8:
        raise StateError("this is not a gLLM KV state, or it is truncated (its header runs past its end)")
    try:
        header = json.loads(bytes(state[8 : 8 + length]))
    except (UnicodeDecodeError, ValueError):
        raise StateError("this is not a gLLM KV state (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise StateError("this is not a gLLM KV state (its header has no metadata)")
    return meta


def _crc32(tokens: torch.Tensor, kv: torch.Tensor) -> str:
    crc = zlib.crc32(tokens.numpy().tobytes())
    crc = zlib.crc32(kv.view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _name(dtype: torch.dtype) -> str:
    return next((name for name, d in _DTYPES.items() if d == dtype), str(dtype))
