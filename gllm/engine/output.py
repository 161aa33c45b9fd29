"""Per-request output: incremental text, stop strings, logprobs, and the final result."""

from __future__ import annotations

import time

from gllm.engine.params import GenerationResult, TokenDelta
from gllm.engine.sequence import Sequence
from gllm.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestOutput:
    """Collects what one request has produced and turns each sampled token into a ``TokenDelta``.

    Text that might be the start of a stop string is held back until it is clear that it is not; when a
    stop string appears, the text ends just before it and the request finishes with reason ``stop``.
    """

    def __init__(self, seq: Sequence, tokenizer: Tokenizer | None, stop: list[str] | None):
        self.seq = seq
        self.stop = stop or []
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.text = ""  # all decoded text (may run past a stop string)
        self.emitted = 0  # characters of ``text`` already handed out
        self.token_ids: list[int] = []  # the sampled tokens (the sequence's also holds injected ones)
        self.num_injected = 0
        self._injected_now: list[list[int]] = []  # injections since the last sampled token
        self.logprobs: list[float] = []
        self.ranks: list[int] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.result: GenerationResult | None = None
        self.cut = False  # the text ends before a stop string

    def add_token(
        self, token_id: int, logprob: float, rank: int, top: list[tuple[int, float]], reason: str | None
    ) -> tuple[TokenDelta, str | None]:
        """Record a token; returns its delta and the finish reason (a stop string may add one)."""
        index = len(self.logprobs)
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.ranks.append(rank)
        self.top_logprobs.append(top)
        if self.seq.first_token_time is None:
            self.seq.first_token_time = time.perf_counter()
        if self.detokenizer is not None:
            self.text += self.detokenizer.push(token_id)
            if reason is not None:  # the end: release a held-back partial character
                self.text += self.detokenizer.flush()
        end = len(self.text)
        if self.stop:
            hit = self._find_stop()
            if hit is not None:
                self.text, end, reason, self.cut = self.text[:hit], hit, "stop", True
            elif reason is None:
                end -= self._holdback()
        new_text = self.text[self.emitted : end]
        self.emitted = end
        delta = TokenDelta(self.seq.request_id, index, token_id, new_text, logprob, rank, top, reason is not None, reason,
                           injected=sum(map(len, self._injected_now)), injected_ids=self._injected_now)
        self._injected_now = []
        return delta, reason

    def injected(self, token_ids: list[int]) -> None:
        """Tokens were appended to the context: the next token's delta says so."""
        self._injected_now.append(token_ids)
        self.num_injected += len(token_ids)

    def _find_stop(self) -> int | None:
        window_start = max(0, self.emitted - max(map(len, self.stop)))
        hits = [p for s in self.stop if (p := self.text.find(s, window_start)) >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        for n in range(min(len(self.text) - self.emitted, max(map(len, self.stop)) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def finish(self, reason: str) -> GenerationResult:
        seq = self.seq
        now = time.perf_counter()
        ms = lambda t: None if t is None else round((t - seq.arrival_time) * 1000, 3)  # noqa: E731
        n = len(self.logprobs)
        self.result = GenerationResult(
            request_id=seq.request_id,
            text=self.text,
            token_ids=self.token_ids[:n],
            logprobs=self.logprobs,
            ranks=self.ranks,
            top_logprobs=self.top_logprobs,
            finish_reason=reason,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            num_cached_tokens=seq.num_cached_tokens,
            metrics={
                "queued_ms": ms(seq.scheduled_time),
                "ttft_ms": ms(seq.first_token_time),
                "total_ms": ms(now),
            },
            num_injected_tokens=self.num_injected,
        )
        return self.result
