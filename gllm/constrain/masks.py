"""The allowed tokens of a step's constrained rows, computed while the model runs.

The engine asks for the masks before it runs the model and collects them after: llguidance computes
them on its own threads without holding Python's lock, so the work overlaps the forward pass instead
of adding to it. The result is a ``TokenBitmask`` (the sampler's own type: int32 words, bit set =
allowed), which says nothing of grammars.
"""

from __future__ import annotations

import concurrent.futures

import llguidance
import torch

from gllm.constrain.matcher import Constraint
from gllm.sample.bitmask import TokenBitmask


class MaskBuilder:
    def __init__(self, vocab_size: int):
        self.words_per_row = (vocab_size + 31) // 32
        self._executor: llguidance.LLExecutor | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gllm-masks")

    def start(self, rows: list[tuple[int, Constraint]]) -> PendingMasks | None:
        """Start computing the masks of ``(row, constraint)`` pairs; None when there are none."""
        if not rows:
            return None
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        words = torch.empty(len(rows), self.words_per_row, dtype=torch.int32)
        matchers = [(c.matcher, i) for i, (_, c) in enumerate(rows)]
        job = self._thread.submit(self._executor.unsafe_compute_mask_ptr, matchers, words.data_ptr(),
                                  self.words_per_row * 4, len(rows))
        return PendingMasks(rows, words, job)


class PendingMasks:
    """Masks being computed: ``result()`` waits for them."""

    def __init__(self, rows: list[tuple[int, Constraint]], words: torch.Tensor, job: concurrent.futures.Future):
        self.rows = rows
        self.words = words
        self.job = job

    def result(self) -> tuple[TokenBitmask, list[int]]:
        """The bitmask, and the rows whose matcher failed (their mask then allows every token: the engine
        ends those requests, and the token drawn for them is never used)."""
        self.job.result()
        failed = [row for row, c in self.rows if c.error is not None]
        if failed:
            self.words[[i for i, (_, c) in enumerate(self.rows) if c.error is not None]] = -1
        return TokenBitmask([row for row, _ in self.rows], self.words), failed
