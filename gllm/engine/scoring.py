"""Candidate scoring: the log-likelihood of each of several continuations of one prompt.

How a candidate is tokenized: the prompt is tokenized as a generation prompt would be (text with the
tokenizer's special tokens, a chat template, or ids as given); each text candidate is tokenized *on its
own*, without special tokens, and its ids are appended to the prompt's ids. BPE never merges across the
boundary, so ``" e4"`` (leading space) and ``"e4"`` are different candidates: put the separator in the
candidate, the way the model would write it. A candidate given as token ids is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScoreRequest:
    """Score ``candidates`` as continuations of one prompt (give exactly one of the three prompt forms)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    candidates: list[str | list[int]] = field(default_factory=list)
    priority: int = 0
    thinking: bool = False  # with messages: the chat template's thinking switch (see GenerationRequest)
    request_id: str | None = None
    adapter: str | None = None  # name of a loaded LoRA adapter to score under

    def validate(self) -> None:
        given = [n for n in ("prompt", "messages", "prompt_token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if not isinstance(self.candidates, list) or not self.candidates:
            raise ValueError("candidates must be a non-empty list of strings or token-id lists")
        for i, c in enumerate(self.candidates):
            if isinstance(c, str):
                if not c:
                    raise ValueError(f"candidate {i} is an empty string")
            elif not isinstance(c, list) or not c or not all(isinstance(t, int) for t in c):
                raise ValueError(f"candidate {i} must be a non-empty string or a non-empty list of token ids")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError("adapter must be the name of a loaded adapter (a string)")


@dataclass
class CandidateScore:
    text: str
    token_ids: list[int]
    logprob: float  # sum of token_logprobs: log P(candidate | prompt)
    token_logprobs: list[float]


@dataclass
class ScoreResult:
    request_id: str
    candidates: list[CandidateScore]  # in input order
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finish_reason: str = "scored"  # or "aborted", or "error" (a fault in the engine)
    metrics: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None  # with finish_reason "error": what failed
