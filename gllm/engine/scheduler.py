"""Scheduler: one rule fills each step's token budget, decodes first, then prompt chunks.

Every sequence has ``num_computed_tokens`` and ``num_tokens``; a step gives each scheduled sequence a
chunk of its uncomputed tokens (one token for a decode, up to the remaining budget for a prompt). Prompt
chunks and decodes share one packed batch: there is no separate prefill phase. When the KV cache runs
out of blocks, the lowest-priority, newest running sequence is preempted (its blocks freed) and later
recomputed from scratch, with the help of the prefix cache.

A paced sequence (``token_interval``) keeps its blocks and its place among the running, but is left out
of every step until its next token is due, so its share of the compute goes to the others.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gllm.engine.sequence import Sequence, Status
from gllm.kv import BlockManager


class ScheduledChunk:
    """The tokens ``start .. start + num_tokens - 1`` of a sequence, computed in this step.

    ``completes``: the chunk reaches the end of the sequence, so its last position is sampled (or, for
    scoring, the sequence is done); ``num_logits``: how many of its last positions need logits.
    """

    __slots__ = ("seq", "num_tokens", "start", "completes", "samples", "num_logits")

    def __init__(self, seq: Sequence, num_tokens: int):
        self.seq = seq
        self.num_tokens = num_tokens
        self.start = start = seq.num_computed_tokens
        end = start + num_tokens
        self.completes = end == len(seq.token_ids)
        self.samples = self.completes and seq.samples
        if seq.logits_from is not None and end > seq.logits_from:
            self.num_logits = end - max(start, seq.logits_from)
        else:
            self.num_logits = 1 if self.completes else 0

    @classmethod
    def ahead(cls, seq: Sequence, start: int) -> ScheduledChunk:
        """A decode of position ``start`` queued before the host has the token there (it is sampled on
        the device by the step still running)."""
        chunk = cls.__new__(cls)
        chunk.seq, chunk.num_tokens, chunk.start = seq, 1, start
        chunk.completes = chunk.samples = True
        chunk.num_logits = 1
        return chunk


@dataclass
class SchedulePlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # one-token chunks first
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy before the step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, token_budget: int,
                 clock: Callable[[], float] = time.monotonic):
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.clock = clock  # what pacing measures time with
        self.waiting: list[tuple[tuple[int, float, int], Sequence]] = []  # heap by sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def wait_time(self) -> float:
        """Seconds until a step would have something to run (0: now). Only paced sequences make it wait."""
        if (self.waiting and len(self.running) < self.max_batch_size) or not self.running:
            return 0.0
        return max(0.0, min(s.next_due for s in self.running) - self.clock())

    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan()
        budget = self.token_budget
        now = self.clock()
        due = [s for s in self.running if s.next_due <= now]
        order = sorted(due, key=lambda s: (s.num_remaining > 1, s.sort_key))
        i = 0
        while i < len(order) and budget > 0:
            seq = order[i]
            n = min(seq.num_remaining, budget)
            while not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + n, seq.num_computed_tokens):
                victim = order.pop()  # the last candidate: prompt chunks, lowest priority, newest
                self._preempt(victim, plan)
                if victim is seq:
                    break
            else:
                plan.copies += self.blocks.grow(seq.block_table, seq.num_computed_tokens + n, seq.num_computed_tokens)
                plan.chunks.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
        if not plan.preempted:
            budget = self._admit(plan, budget)
        # decodes first; rows of one LoRA adapter side by side, so that they form one group (gllm.lora)
        plan.chunks.sort(key=lambda c: (c.num_tokens > 1, c.seq.adapter_uid))
        return plan

    def plan_ahead(self, plan: SchedulePlan) -> SchedulePlan | None:
        """The step after ``plan``, planned before ``plan``'s tokens are known: the same sequences decoding
        one position further (``LLMEngine`` queues it while the host reads ``plan``'s tokens).

        Only when that is surely what ``schedule`` would plan next: plain decodes, nothing waiting that
        could join, no sequence ending on length with ``plan``'s token, no constrained sequence, and free
        blocks for every next position. A sequence that stops on a sampled token instead computes one
        position for nothing.
        """
        if plan.preempted or (self.waiting and len(self.running) < self.max_batch_size):
            return None
        needed = 0
        for c in plan.chunks:
            seq = c.seq
            if seq.status is not Status.RUNNING or not c.samples or c.num_tokens != 1 or c.num_logits != 1:
                return None
            if seq.pending_forks or seq.logits_from is not None or seq.num_tokens + 1 >= seq.max_tokens:
                return None
            if seq.constraint is not None or seq.token_interval:  # its next mask needs this step's token; or paced
                return None
            needed += self.blocks.growth(seq.block_table, c.start + 2, c.start + 1)
        if needed > self.blocks.pool.num_free:
            return None
        ahead = SchedulePlan()
        for c in plan.chunks:
            ahead.copies += self.blocks.grow(c.seq.block_table, c.start + 2, c.start + 1)
            ahead.chunks.append(ScheduledChunk.ahead(c.seq, c.start + 1))
        return ahead

    def _admit(self, plan: SchedulePlan, budget: int) -> int:
        """Start waiting sequences while budget, batch slots and free blocks allow (never preempting)."""
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0][1]
            if seq.num_computed_tokens == 0 and not seq.block_table:
                seq.block_table, seq.block_keys = self.blocks.match_prefix(seq.token_ids[: seq.cache_limit],
                                                                           seq.cache_salt)
                seq.num_computed_tokens = len(seq.block_table) * self.blocks.block_size
                self.blocks.release_passed(seq.block_table, seq.num_computed_tokens)  # cached hits behind a window
                if seq.scheduled_time is None:  # cache hits count at the first start, not after a preemption
                    seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            n = min(seq.num_remaining, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + n):
                self.blocks.free(seq.block_table)  # give back the prefix hits; retry in a later step
                seq.block_keys, seq.num_computed_tokens = [], 0
                break
            heapq.heappop(self.waiting)
            self.blocks.grow(seq.block_table, seq.num_computed_tokens + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, plan: SchedulePlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.num_preemptions += 1
        plan.preempted.append(seq)
        self.add(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_keys = []
        seq.num_computed_tokens = 0

    def update(self, plan: SchedulePlan, sampled: dict[Sequence, int]) -> list[tuple[Sequence, int, str | None]]:
        """Advance computed counts, start forks, append sampled tokens, cache full blocks, finish what is done.

        ``sampled`` maps each sampling sequence, and each fork it starts, to its new token. Returns
        ``(sequence, token_id, finish_reason)`` for every sampled token, in plan order.
        """
        events = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not Status.RUNNING:
                continue  # finished by an abort during the step
            seq.num_computed_tokens += chunk.num_tokens
            self.blocks.commit(seq.block_table, seq.block_keys, seq.token_ids, seq.num_computed_tokens, seq.cache_salt)
            self.blocks.release_passed(seq.block_table, seq.num_computed_tokens)
            if not chunk.completes:
                continue
            for child in seq.pending_forks:
                self.fork(seq, child)
                events += self._advance(child, sampled.get(child))
            seq.pending_forks = []
            events += self._advance(seq, sampled.get(seq))
        return events

    def _advance(self, seq: Sequence, token: int | None) -> list[tuple[Sequence, int, str | None]]:
        """Append a sampled token (finishing on a stop), or finish a scoring sequence that has run."""
        if seq.status is not Status.RUNNING:
            return []
        if not seq.samples:
            if seq.num_remaining == 0:
                self.finish(seq, "scored")
            return []
        reason = seq.append(token)
        if reason is not None:
            self.finish(seq, reason)
        elif seq.token_interval:
            seq.next_due = self.clock() + seq.token_interval
        return [(seq, token, reason)]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` as a copy of ``parent``'s computed state, sharing its blocks (copy on write)."""
        self.blocks.share(parent.block_table, child.block_table)
        child.block_keys = list(parent.block_keys)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = Status.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (done, stopped or aborted) and free its blocks; idempotent."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self._finished.append(seq)

    def drain_finished(self) -> list[Sequence]:
        """Sequences finished since the last call."""
        done, self._finished = self._finished, []
        return done
