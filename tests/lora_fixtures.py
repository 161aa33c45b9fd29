"""Random LoRA adapters made with `peft` on the tiny test models, and the HF + peft reference outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
import transformers

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base: transformers.PreTrainedModel,
    folder: Path,
    seed: int,
    targets: list[str] = ALL_TARGETS,
    r: int = 4,
    alpha: float = 8,
    **options,
) -> peft.PeftModel:
    """Save a PEFT LoRA adapter with random A and B (large enough to change greedy choices) to ``folder``
    and return the HF + peft model (on a copy of ``base``)."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF generate (greedy) on one prompt: the tokens and their log-softmax."""
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logits = torch.cat(out.logits).float()
    return tokens, logits.log_softmax(-1)[torch.arange(len(tokens)), tokens].tolist()
