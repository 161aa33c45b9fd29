"""Compiling grammars for one model, and the matcher that follows one sequence's tokens.

``GrammarCompiler`` owns llguidance's view of the model's tokenizer (built once, on the first
constrained request: it takes about half a second for a 50,000-token vocabulary) and compiles each
request's grammar under the runtime's limits. A ``Constraint`` is one sequence's matcher: it consumes
every token the sequence gets and says which tokens the grammar forces next (fast-forward).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import llguidance
import llguidance.hf

from gllm.constrain.tools import ToolCall, ToolCallFormat
from gllm.tokenizer import Tokenizer


@dataclass(frozen=True)
class GrammarLimits:
    """How much work one request's grammar may ask for (llguidance's parser limits)."""

    max_grammar_size: int = 500_000  # symbols in the grammar's productions
    grammar_fuel: int = 1_000_000  # work allowed to build the lexer when the grammar compiles (about 50 per us)


class GrammarLimitError(ValueError):
    """A grammar beyond one of ``GrammarLimits``; ``limit`` names which."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


# How llguidance words the two limits it enforces at compile time (its error text is all it returns).
_LIMIT_MESSAGES = {"grammar size": "max_grammar_size", "initial lexer configuration": "grammar_fuel"}


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar checked against the model's tokenizer; ``template`` is copied into every sequence."""

    template: llguidance.LLMatcher
    tool_format: ToolCallFormat | None = None  # set when the grammar is a tool-call reply


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: Iterable[int],
                 limits: GrammarLimits = GrammarLimits()):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.limits = limits
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer for this model, with every end-of-turn token as its EOS."""
        with self._lock:
            if self._lltokenizer is None:
                if self.tokenizer is None:
                    raise ValueError("this model has no tokenizer, which structured output needs")
                if not self.eos_token_ids:
                    raise ValueError("this model has no end-of-sequence token, which structured output needs")
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer.hf, n_vocab=max(self.vocab_size, self.tokenizer.vocab_size),
                    eos_token=self.eos_token_ids)
            return self._lltokenizer

    def token_id(self, text: str) -> int | None:
        """The id of a special token written out (``<|im_end|>``), or None."""
        if self.tokenizer is None:
            return None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and self.tokenizer.token_text(ids[0]) == text else None

    def compile(self, grammar: str, tool_format: ToolCallFormat | None = None) -> CompiledGrammar:
        """Check ``grammar`` (llguidance's form) against the tokenizer and the limits.

        Raises ``GrammarLimitError`` past a limit and ``ValueError`` with llguidance's reason for a grammar
        that does not compile."""
        limits = llguidance.LLParserLimits(max_grammar_size=self.limits.max_grammar_size,
                                           initial_lexer_fuel=self.limits.grammar_fuel)
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            reason = matcher.get_error()
            for words, limit in _LIMIT_MESSAGES.items():
                if words in reason:
                    raise GrammarLimitError(limit, f"the grammar is too large or complex: {reason}")
            raise ValueError(f"the grammar does not compile: {reason}")
        return CompiledGrammar(matcher, tool_format)

    def constraint(self, grammar: CompiledGrammar) -> Constraint:
        return Constraint(grammar.template.deep_copy(), grammar.tool_format)


class Constraint:
    """One sequence's matcher: what it has generated so far, checked token by token.

    The matcher stays in step with the sequence's tokens, forced ones included; a preempted sequence
    keeps its tokens and so its matcher as it is.
    """

    def __init__(self, matcher: llguidance.LLMatcher, tool_format: ToolCallFormat | None):
        self.matcher = matcher
        self.tool_format = tool_format

    def advance(self, token_id: int, room: int) -> list[int]:
        """Consume a sampled token, then the tokens the grammar forces after it, at most ``room`` of them;
        returns those forced tokens. A token the grammar refuses leaves ``error`` set."""
        if not self.matcher.consume_token(token_id) or self.matcher.is_stopped() or room <= 0:
            return []
        forced = self.matcher.compute_ff_tokens()[:room]
        if forced and not self.matcher.consume_tokens(forced):
            return []
        return forced

    def replay(self, token_ids: list[int]) -> bool:
        """Consume tokens generated elsewhere under the same grammar (a stream resumed on another replica).
        Forced tokens need no special turn: they were the only ones allowed. False if the grammar refuses."""
        return bool(self.matcher.consume_tokens(token_ids)) and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "the matcher failed"

    @property
    def stopped(self) -> bool:
        """Nothing may follow what was generated (the structure is complete, or the end was taken)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def accepting(self) -> bool:
        """What was generated is a whole match (it could end here)."""
        return self.matcher.is_accepting() and not self.matcher.is_error()

    def tool_calls(self, text: str) -> list[ToolCall]:
        return self.tool_format.parse(text) if self.tool_format else []
