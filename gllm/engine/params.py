"""What callers hand the engine (GeneratorParams, GenerationRequest) and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gllm.constrain import OutputConstraint, ToolCall, check_tools


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
    max_pinned_blocks: int | None = None  # KV blocks restored states may pin (default: half the cache) ...
    max_pinned_memory: int | None = None  # ... or in bytes

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"GeneratorParams.{name} must be at least 1 (got {getattr(self, name)})")
        if self.num_kv_blocks is not None and self.kv_memory is not None:
            raise ValueError("give the KV cache size as num_kv_blocks or as kv_memory, not both")
        if self.max_pinned_blocks is not None and self.max_pinned_memory is not None:
            raise ValueError("give the pinned limit as max_pinned_blocks or as max_pinned_memory, not both")

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens or max(512, self.max_seq_len)


CONTEXT_OVERFLOW = ("error", "drop_oldest")


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
    # (token id, logprob, rank) of tokens this request already produced and handed out elsewhere (a replica
    # that died mid-stream): it goes on after them as if it had sampled them itself, its next token being
    # number len(resume). Greedy and seeded requests continue exactly: a seeded one skips their draws.
    resume: list[tuple[int, float, int]] | None = None
    # Injections among those tokens: (index of the resumed token they came right before, their ids), in order;
    # an index of len(resume) puts them after the last one.
    resume_injected: list[tuple[int, list[int]]] | None = None
    request_id: str | None = None  # assigned by the engine when missing
    adapter: str | None = None  # name of a loaded LoRA adapter to apply (``LLMEngine.load_adapter``)
    # Structured output (gllm.constrain): at most one of json_schema, grammar, regex, choices; and tools.
    json_schema: dict[str, Any] | bool | None = None  # a JSON Schema; {} or True: any JSON object
    grammar: str | None = None  # GBNF, or Lark with grammar_syntax="lark"
    grammar_syntax: str = "gbnf"
    regex: str | None = None
    choices: list[str] | None = None  # the output is exactly one of these
    tools: list[dict[str, Any]] | None = None  # {name, description, parameters (JSON Schema of the arguments)}
    tool_choice: str | None = None  # "auto" (the default with tools), "required", "none" or a tool's name

    @property
    def output_constraint(self) -> OutputConstraint:
        return OutputConstraint(self.json_schema, self.grammar, self.grammar_syntax, self.regex, self.choices)

    @property
    def calls_tools(self) -> bool:
        return self.tools is not None and self.tool_choice != "none"
    # Game state: long chats, pacing, exact replay (see gllm.engine.game_state)
    context_overflow: str = "error"  # "drop_oldest": drop the oldest turns after the system messages to fit
    max_tokens_per_second: float | None = None  # pacing: the next token is not computed before it is due
    deadline_ms: float | None = None  # wanted time to first token; earlier deadlines first within a priority
    deterministic: bool = False  # same tokens alone or in any batch (batch-invariant kernels; CPU only)

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
        if self.resume is not None and self.n != 1:
            raise ValueError(f"a resumed request continues one stream: n must be 1 (got {self.n})")
        if self.resume_injected:
            places = [i for i, _ in self.resume_injected]
            if places != sorted(places) or places[0] < 0 or places[-1] > len(self.resume or ()):
                raise ValueError("resume_injected: indexes must be in order, within 0..len(resume)")
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (got {self.logprobs})")
        if self.stop is not None and (
            not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise ValueError("stop must be a list of non-empty strings")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError("adapter must be the name of a loaded adapter (a string)")
        if self.adapter is not None and self.deterministic:
            raise ValueError("deterministic requests run without a LoRA adapter (its grouped products are not "
                             "batch-invariant)")
        self.output_constraint.check()
        check_tools(self.tools, self.tool_choice)
        if self.calls_tools and self.output_constraint.given:
            raise ValueError("tools cannot be combined with json_schema, grammar, regex or choices "
                             "(a tool's parameters constrain its arguments)")
        if self.context_overflow not in CONTEXT_OVERFLOW:
            raise ValueError(f"context_overflow must be one of {', '.join(CONTEXT_OVERFLOW)} (got {self.context_overflow!r})")
        if self.context_overflow == "drop_oldest" and self.messages is None:
            raise ValueError("context_overflow 'drop_oldest' drops chat turns: it needs messages")
        if self.max_tokens_per_second is not None and not self.max_tokens_per_second > 0:
            raise ValueError(f"max_tokens_per_second must be > 0 (got {self.max_tokens_per_second})")
        if self.deadline_ms is not None and not self.deadline_ms >= 0:
            raise ValueError(f"deadline_ms must be >= 0 (got {self.deadline_ms})")


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
    injected: int = 0  # tokens injected into the context just before this one (``LLMEngine.inject``)
    injected_ids: list[list[int]] = field(default_factory=list)  # those tokens, one list per injection


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
    tool_calls: list[ToolCall] = field(default_factory=list)  # the calls in the text, arguments parsed
    structure_complete: bool | None = None  # constrained output only: False when cut short (e.g. by length)
    num_dropped_turns: int = 0  # chat messages left out to fit (context_overflow "drop_oldest")
    num_injected_tokens: int = 0  # tokens injected while it ran
