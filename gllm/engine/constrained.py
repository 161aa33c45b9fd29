"""The engine's side of structured output: a request's grammar and prompt, each step's masks, and
the tokens a grammar forces.

Around ``LLMEngine.step``: ``compile`` when a request arrives (a schema or grammar that does not compile
is refused there, and nothing else changes); ``start_masks`` before the model runs, so that the masks of
the rows about to sample are computed while it runs; ``after_sample`` after a token is sampled. A grammar
that forces what comes next (a JSON key, the rest of a tool's name) makes it append those tokens
at once, without sampling; the next step computes them like a prompt chunk, together with the position
that samples after them, and reports them with their raw logprobs (``GenerationJob.expect_forced``).
"""

from __future__ import annotations

import threading
from typing import Any

from gllm.constrain import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarLimits,
    MaskBuilder,
    PendingMasks,
    template_tools,
    tool_call_format,
)
from gllm.engine.jobs import GenerationJob
from gllm.engine.params import GenerationRequest, TokenDelta
from gllm.engine.scheduler import SchedulePlan
from gllm.engine.sequence import Sequence
from gllm.tokenizer import Tokenizer


class Constraints:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: frozenset[int],
                 limits: GrammarLimits):
        self.tokenizer = tokenizer
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids, limits)
        self.masks = MaskBuilder(vocab_size)
        template = getattr(tokenizer.hf, "chat_template", None) if tokenizer else None
        self.tool_format = tool_call_format(template if isinstance(template, str) else None)
        self.forced_tokens = 0  # appended without sampling, since the engine started

    def warm_up(self) -> None:
        """Build llguidance's tokenizer on a background thread now (about half a second for a 50,000-token
        vocabulary), instead of in the first constrained request; for a server that starts once."""
        if self.tokenizer is not None and self.compiler.eos_token_ids:
            threading.Thread(target=lambda: self.compiler.lltokenizer, name="gllm-grammar-warm-up",
                             daemon=True).start()

    def chat(self, req: Any) -> tuple[list[dict[str, str]], list[dict[str, Any]] | None]:
        """A request's chat messages and the tools to hand its chat template (None: the template is not
        told). A template that cannot list tools gets them described in the system message instead."""
        if not isinstance(req, GenerationRequest) or not req.calls_tools:
            return req.messages, None
        if self.tool_format.native:
            return req.messages, template_tools(req.tools)
        return self.tool_format.messages(req.messages, req.tools, req.tool_choice or "auto"), None

    def compile(self, req: GenerationRequest) -> CompiledGrammar | None:
        """The request's grammar, checked against the model (None when it asks for no structure).
        Raises ``ValueError`` (``GrammarLimitError`` past a limit) saying why it cannot be used."""
        if req.calls_tools:
            grammar = self.tool_format.grammar(req.tools, req.tool_choice or "auto")
            return self.compiler.compile(grammar, self.tool_format)
        spec = req.output_constraint
        if not spec.given:
            return None
        return self.compiler.compile(spec.grammar_text(self.compiler.token_id, self.compiler.vocab_size))

    def start_masks(self, plan: SchedulePlan) -> PendingMasks | None:
        """Start the masks of this step's constrained rows (rows in the order ``LLMEngine._sample`` uses)."""
        rows = [(i, seq.constraint) for i, seq in enumerate(sampling_order(plan)) if seq.constraint is not None]
        return self.masks.start(rows)

    def after_sample(self, seq: Sequence, token_id: int, job: GenerationJob, delta: TokenDelta) -> str | None:
        """Advance ``seq``'s grammar past its new token and append the tokens it forces next (leaving room
        for one more sample; ``job`` reports them once the next step has their logprobs). Returns the
        finish reason this causes: ``stop`` when nothing may follow, ``error`` when the grammar failed."""
        constraint = seq.constraint
        assert constraint is not None
        forced = constraint.advance(token_id, room=seq.max_tokens - seq.num_tokens - 1)
        if constraint.error is not None:
            job.error = f"the grammar failed: {constraint.error}"
            final = "error"
        else:
            seq.token_ids.extend(forced)
            job.expect_forced(seq, len(forced))
            self.forced_tokens += len(forced)
            final = "stop" if constraint.stopped and not forced else None
        delta.finished, delta.finish_reason = final is not None, final
        return final


def sampling_order(plan: SchedulePlan) -> list[Sequence]:
    """The sequences that sample in a step, in row order: each completing chunk's, then its new forks."""
    return [s for c in plan.chunks if c.samples for s in (c.seq, *c.seq.pending_forks)]
