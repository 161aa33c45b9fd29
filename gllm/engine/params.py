"""What callers hand the engine (GeneratorParams, GenerationRequest) and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GeneratorParams:
    """Engine capacity. Leave the KV size unset to get room for ``max_batch_size`` full sequences."""

    block_size: int = 16
    max_batch_size: int = 8  # requests running at once
    max_seq_len: int = 2048  # prompt + generated tokens of one request
    max_num_batched_tokens: int | None = None  # token budget of one step (default: max(512, max_seq_len))
    num_kv_blocks: int | None = None  # KV cache size in blocks ...
    kv_memory: int | None = None  # ... or in bytes
    enable_prefix_caching: bool = True
    seed: int | None = None  # seed of the generator shared by requests without their own seed

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"GeneratorParams.{name} must be at least 1 (got {getattr(self, name)})")
        if self.num_kv_blocks is not None and self.kv_memory is not None:
            raise ValueError("give the KV cache size as num_kv_blocks or as kv_memory, not both")

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens or max(512, self.max_seq_len)


@dataclass
class GenerationRequest:
    """One generation. Give exactly one of ``prompt``, ``messages`` (chat template applied) or ``prompt_token_ids``."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # own generator: tokens do not depend on the rest of the batch
    stop: list[str] | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None
    logprobs: int = 0  # top-n alternatives per token; the sampled token's logprob is always returned
    priority: int = 0  # higher runs first; FCFS within a priority
    ignore_eos: bool = False  # for benchmarks: run to max_new_tokens
    n: int = 1  # continuations of the prompt, sharing its KV blocks; fork i uses seed + i when seeded
    prompt_logprobs: bool = False  # also return the logprob of every prompt token (the first has none)
    thinking: bool = False  # with messages: let a thinking model (Qwen3, SmolLM3) reason before it answers
    request_id: str | None = None  # assigned by the engine when missing
    adapter: str | None = None  # name of a loaded LoRA adapter to apply (``LLMEngine.load_adapter``)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is wrong."""
        given = [n for n in ("prompt", "messages", "prompt_token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError("prompt must be a string")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, 0 meaning off (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not isinstance(self.thinking, bool):
            raise ValueError(f"thinking must be true or false (got {self.thinking!r})")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1 (got {self.n})")
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (got {self.logprobs})")
        if self.stop is not None and (
            not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise ValueError("stop must be a list of non-empty strings")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError("adapter must be the name of a loaded adapter (a string)")


@dataclass
class TokenDelta:
    """One sampled token as it streams out."""

    request_id: str
    index: int  # position in the completion, from 0
    token_id: int
    text: str  # new text (may be "" while a multi-byte character is incomplete or a stop string may match)
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]]
    finished: bool = False
    finish_reason: str | None = None
    fork: int = 0  # which of the request's n continuations


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str  # "stop", "length", "aborted", or "error" (a fault in the engine)
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    metrics: dict[str, Any] = field(default_factory=dict)  # queued_ms, ttft_ms, total_ms
    prompt_logprobs: list[float | None] | None = None  # when asked: None for the first prompt token
    forks: list["GenerationResult"] = field(default_factory=list)  # all n continuations when n > 1, this one first
    error: str | None = None  # with finish_reason "error": what failed
