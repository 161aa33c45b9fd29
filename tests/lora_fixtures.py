"""Random LoRA adapters made with `peft` on the tiny test models, and the HF + peft reference outputs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import gguf
import numpy as np
import peft
import safetensors.torch
import torch
import transformers

from test_parity_hf import hf_greedy as hf_greedy_with_gap

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base: transformers.PreTrainedModel,
    folder: Path,
    seed: int,
    targets: list[str] = ALL_TARGETS,
    r: int = 4,
    alpha: float = 8,
    std: float = 0.15,
    **options,
) -> peft.PeftModel:
    """Save a PEFT LoRA adapter with random A and B (of standard deviation ``std``: by default large enough
    to change a tiny model's greedy choices) to ``folder`` and return the HF + peft model (on a copy of
    ``base``)."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF generate (greedy) on one prompt: the tokens and their log-softmax."""
    tokens, logprobs, _ = hf_greedy_with_gap(model, prompt, n)
    return tokens, logprobs


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}  # fmt: skip


def llama_cpp_row_order(b: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converters give Q and K projections (and the B of their LoRA pairs):
    within each head, the two rotary halves interleaved."""
    rows = b.shape[0]
    return b.reshape(heads, 2, rows // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def peft_to_gguf(folder: Path, out: Path, heads: int, kv_heads: int, dtype=np.float32, arch: str = "llama") -> None:
    """Write a PEFT adapter as llama.cpp's GGUF LoRA format (what its convert_lora_to_gguf.py produces)."""
    alpha = json.loads((folder / "adapter_config.json").read_text())["lora_alpha"]
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    for name, tensor in sorted(tensors.items()):
        layer, module, half = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight", name).groups()
        if half == "B" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            tensor = llama_cpp_row_order(tensor, heads if module.endswith("q_proj") else kv_heads)
        writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_{half.lower()}", tensor.numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
