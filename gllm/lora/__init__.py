"""LoRA adapters per request: files (PEFT, GGUF), fitting to a model, and grouped low-rank products."""

from gllm.lora.adapter import LoraAdapter
from gllm.lora.files import AdapterError, read_adapter
from gllm.lora.registry import AdapterRegistry

__all__ = ["AdapterError", "AdapterRegistry", "LoraAdapter", "read_adapter"]
