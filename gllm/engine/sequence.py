"""Sequence: the engine's state for one request as it moves waiting -> running -> finished."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gllm.kv import BlockKey
from gllm.lora import LoraAdapter
from gllm.sample import SamplingRow

if TYPE_CHECKING:
    from gllm.constrain import Constraint


EXACT_SALT = 0x6578616374  # the first parent hash of exact sequences' blocks


def cache_salt(exact: bool, adapter: LoraAdapter | None) -> int | None:
    """The first parent hash of a sequence's cached blocks: exact sequences share blocks only among
    themselves, and K/V computed under a LoRA adapter only with the same adapter (its ``uid``, never reused
    in a process, so an adapter reloaded under the same name does not match either)."""
    salt = EXACT_SALT if exact else None
    return salt if adapter is None else hash((salt, "lora", adapter.uid))


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
    constraint: Constraint | None = None  # structured output: follows every token, forced ones included
    # Game state: pacing, deadlines, exact replay
    token_interval: float = 0.0  # pacing: seconds from one token to the next (0 = as fast as possible)
    next_due: float = 0.0  # the scheduler's clock time before which it does not run this sequence
    deadline: float = math.inf  # perf_counter time wanted for the first token; earlier first within a priority
    exact: bool = False  # attention per token (batch-invariant); its cached blocks use their own hash chain

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def cache_limit(self) -> int:
        """How many leading tokens may come from the prefix cache (positions needing logits must run)."""
        return self.num_tokens if self.logits_from is None else self.logits_from + 1

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Higher priority first, then the earlier deadline, then first come first served."""
        return (-self.priority, self.deadline, self.arrival)

    @property
    def cache_salt(self) -> int | None:
        """Where its blocks' hash chain starts (see ``cache_salt``)."""
        return cache_salt(self.exact, self.adapter)

    @property
    def adapter_uid(self) -> int:
        """Its LoRA adapter's identity (0: none); the runner groups rows by it."""
        return 0 if self.adapter is None else self.adapter.uid

    def inject(self, token_ids: list[int], limit: int) -> bool:
        """Append tokens to the context at the current position (they are computed before the next sample);
        False, changing nothing, when they leave no room for a token under ``limit`` (``max_seq_len``)."""
        if self.num_tokens + len(token_ids) >= limit:
            return False
        self.token_ids += token_ids
        self.max_tokens = min(self.max_tokens + len(token_ids), limit)
        return True

    def append(self, token_id: int) -> str | None:
        """Add a sampled token; return the finish reason it causes (``stop`` or ``length``), if any."""
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids:
            return "stop"
        if self.num_tokens >= self.max_tokens:
            return "length"
        return None
