"""Sequence: the engine's state for one request as it moves waiting -> running -> finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gllm.kv import BlockKey
from gllm.lora import LoraAdapter
from gllm.sample import SamplingRow


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens, progress and cache blocks of one request.

    ``token_ids`` holds the prompt followed by the generated tokens; the first ``num_computed_tokens`` of
    them have their K/V in ``block_table``. A step computes the next chunk and, once every token is
    computed, samples one more. Preemption frees the blocks and sets ``num_computed_tokens`` back to 0:
    the sequence is later recomputed, generated tokens included.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int  # length cap of token_ids (prompt + new tokens, within max_seq_len)
    sampling: SamplingRow
    priority: int = 0
    arrival: int = 0  # order of arrival, for FCFS within a priority
    eos_token_ids: frozenset[int] = frozenset()
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)
    finish_reason: str | None = None
    fork_index: int = 0  # which of a request's n continuations (or score candidates) this is
    pending_forks: list["Sequence"] = field(default_factory=list)  # start from this one's state once its prompt is done
    samples: bool = True  # False for scoring: the sequence only computes logprobs of given tokens
    logits_from: int | None = None  # every position from here on needs logits (prompt logprobs, scoring)
    adapter: LoraAdapter | None = None  # the LoRA adapter applied to this sequence's rows
    arrival_time: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def cache_limit(self) -> int:
        """How many leading tokens may come from the prefix cache (positions needing logits must run)."""
        return self.num_tokens if self.logits_from is None else self.logits_from + 1

    @property
    def cache_namespace(self) -> int:
        """Prefix-cache namespace: K/V computed under an adapter is shared only with the same adapter."""
        return 0 if self.adapter is None else self.adapter.uid

    @property
    def sort_key(self) -> tuple[int, int]:
        """Higher priority first, then first come first served."""
        return (-self.priority, self.arrival)

    def append(self, token_id: int) -> str | None:
        """Add a sampled token; return the finish reason it causes (``stop`` or ``length``), if any."""
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids:
            return "stop"
        if self.num_tokens >= self.max_tokens:
            return "length"
        return None
