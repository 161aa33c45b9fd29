"""Tiny random checkpoints of every supported family, built with `transformers` (no downloads).

Each entry is a ``transformers`` config class and the overrides that make a small model which still
switches on everything its family differs in: a sliding window shorter than the test prompts, a head
size that is not ``hidden / heads``, partial rotary, long-context RoPE scalings. Weights are drawn from
a normal distribution wide enough that greedy choices are never near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
WINDOW = 8  # sliding window of the families that have one: prompts of up to 100 tokens cross it


@dataclass(frozen=True)
class Family:
    config: str  # transformers config class
    model: str  # transformers causal LM class
    overrides: dict[str, Any] = field(default_factory=dict)
    std: float = 0.5  # weights ~ N(0, std)
    min_prompt: int = 1  # shortest test prompt (Phi-4-mini's long RoPE factors need more than 16 tokens)


FAMILIES = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "mistral": Family("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "qwen2": Family(
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(num_hidden_layers=3, rope_theta=1e6, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM",
                    dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)),
    "gemma2": Family(
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        std=0.2,
    ),
    "gemma3": Family(
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(num_hidden_layers=3, head_dim=32, num_key_value_heads=1, query_pre_attn_scalar=24, sliding_window=WINDOW,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        std=0.2,
    ),
    "phi3": Family(
        "Phi3Config", "Phi3ForCausalLM",
        dict(num_hidden_layers=2, original_max_position_embeddings=512,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                              "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]}),
    ),
    "phi4_mini": Family(
        "Phi3Config", "Phi3ForCausalLM",
        dict(num_hidden_layers=2, original_max_position_embeddings=16, tie_word_embeddings=True,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                              "short_factor": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0],
                              "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}),
        min_prompt=17,
    ),
    "smollm3": Family("SmolLM3Config", "SmolLM3ForCausalLM", dict(num_hidden_layers=4, no_rope_layer_interval=4)),
    "ministral3": Family(
        "Ministral3Config", "Ministral3ForCausalLM",
        dict(num_hidden_layers=2, head_dim=16,
             rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                              "original_max_position_embeddings": 64,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "llama_4_scaling_beta": 0.1}),
    ),
}  # fmt: skip


def build(name: str, folder: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Save a random tiny model of family ``name`` to ``folder`` (safetensors + config.json); return it."""
    family = FAMILIES[name]
    config = getattr(transformers, family.config)(**{**COMMON, **family.overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(config).eval()
    with torch.no_grad():  # every parameter, biases and norms included, so that none is left at a neutral value
        for param in model.parameters():
            param.normal_(0.0, family.std)
    model.save_pretrained(folder)
    return model
