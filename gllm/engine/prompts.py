"""What a request becomes before it is scheduled: the engine's precision (``resolve_dtype``), and a
prompt as token ids (text tokenized, a chat template applied with the request's tools and thinking
switch, or ids checked against the vocabulary), with the check that the KV cache can hold a request."""

from __future__ import annotations

from dataclasses import replace

import torch

from gllm.engine.params import GenerationRequest
from gllm.engine.scoring import ScoreRequest
from gllm.ops.linear import packing_supported


def resolve_dtype(dtype: torch.dtype | str, device: torch.device, blocks: bool = False) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU, on a CPU with bfloat16 kernels, and on any CPU when the weights stay
    in a GGUF file's blocks (``blocks``: the products then round activations to int8 whatever their
    dtype, and the KV cache takes half the memory); it passes the quality check
    (``benchmarks/quality.py``). Else float32. A dtype or its name is kept."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        fast = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or packing_supported(torch.bfloat16, device)
        return torch.bfloat16 if fast or (blocks and device.type == "cpu") else torch.float32
    if dtype in ("float32", "bfloat16"):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32' or 'bfloat16'")


class Prompts:
    """``LLMEngine``'s prompt side (it reads the engine's config, tokenizer, constraints and KV blocks)."""

    def _check_ids(self, ids: list[int], what: str) -> list[int]:
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{what} has ids outside the vocabulary (0..{self.config.vocab_size - 1}): {bad[:5]}")
        return list(ids)

    def prompt_ids(self, req: GenerationRequest | ScoreRequest) -> list[int]:
        """Token ids of a request's prompt (text tokenized, or chat template applied)."""
        if req.prompt_token_ids is not None:
            ids = self._check_ids(req.prompt_token_ids, "prompt_token_ids")
        elif self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer: pass prompt_token_ids")
        elif req.messages is not None:
            if not req.messages:
                raise ValueError("messages is empty")
            ids = self.chat_ids(req)
        else:
            ids = self.tokenizer.encode(req.prompt) if req.prompt else []
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len}, which leaves no room for new tokens"
            )
        return ids

    def chat_ids(self, req: GenerationRequest | ScoreRequest, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of ``req``'s chat prompt, or of ``messages`` in its place (a chat with turns left out),
        with the request's tools and thinking switch."""
        if messages is not None:
            req = replace(req, messages=messages)
        messages, tools = self.constraints.chat(req)
        return self.tokenizer.apply_chat_template(messages, tools=tools, thinking=req.thinking)

    def _check_room(self, max_tokens: int) -> None:
        if self.block_manager.peak_blocks(max_tokens, self.params.token_budget) > self.block_manager.pool.num_blocks:
            raise ValueError(
                f"the KV cache ({self.block_manager.pool.num_blocks} blocks) cannot hold {max_tokens} tokens; "
                "give the engine more KV blocks or ask for fewer tokens"
            )
