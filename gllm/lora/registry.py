"""The adapters loaded into one model, and the hooks through which its linear layers apply them.

Each of the model's ``Linear`` layers gets a ``LoraHook``: after its base product (dense, packed, from
GGUF blocks: whatever kernel it uses) the hook adds the low-rank updates of the step's ``LoraBatch``,
if the step has one. A step without adapters pays one attribute check per layer.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gllm.config import ModelConfig
from gllm.lora.adapter import LoraAdapter
from gllm.lora.files import AdapterError, read_adapter
from gllm.lora.grouped import LoraBatch, StackCache

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class LoraHook:
    """Installed on one linear layer (``site``: its module name): adds the step's updates to its output."""

    def __init__(self, registry: AdapterRegistry, site: str):
        self.registry = registry
        self.site = site

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.registry.batch
        return y if batch is None else batch.apply(self.site, x, y)


class AdapterRegistry:
    """Adapters by name for one model; ``rows`` makes a step's batch apply them."""

    def __init__(self, model: nn.Module, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 triton: bool = False):
        self.config, self.dtype, self.device = config, dtype, device
        self.triton = triton  # mixed rows through the Triton kernels (where the attention runs on Triton)
        self.adapters: dict[str, LoraAdapter] = {}
        self.batch: LoraBatch | None = None
        self._stacks = StackCache()
        for name, module in model.named_modules():
            if hasattr(module, "lora"):  # the model's Linear layers
                module.lora = LoraHook(self, name)

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        """Read and fit an adapter, then make it usable as ``name``. A bad file raises ``AdapterError``
        and changes nothing; a name in use is refused (unload it first)."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded (from {self.adapters[name].source})")
        adapter = LoraAdapter(name, read_adapter(path, self.config), self.config, self.dtype, self.device)
        self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        """Forget an adapter. Requests already running with it finish with it; new ones cannot name it."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        self._stacks.forget(adapter)

    def get(self, name: str) -> LoraAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterError(f"unknown adapter {name!r} (loaded: {known})")
        return adapter

    @contextlib.contextmanager
    def rows(self, spans: list[tuple[LoraAdapter | None, int]]) -> Iterator[None]:
        """Apply adapters during one forward pass: ``spans`` gives each chunk's adapter and row count."""
        if not any(adapter is not None for adapter, _ in spans):
            yield
            return
        self.batch = LoraBatch(spans, self._stacks, self.device, self.triton)
        try:
            yield
        finally:
            self.batch = None
