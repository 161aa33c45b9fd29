"""What a request may constrain its output with, checked and turned into one llguidance grammar.

At most one of ``json_schema``, ``grammar`` (GBNF or Lark text), ``regex`` or ``choices``; tool calls
(``gllm.constrain.tools``) build theirs from the tools' schemas. Checks here are about the fields'
shapes only; whether a schema or grammar compiles is the compiler's to say (``GrammarCompiler``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

from gllm.constrain.gbnf import gbnf_to_lark, lark_string

GRAMMAR_SYNTAXES = ("gbnf", "lark")
# JSON as a model writes it: one space after ':' and ','. No other white space, so a small model cannot
# loop on blank lines, and llguidance can force the separators (fast-forward) instead of sampling them.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class OutputConstraint:
    """The structure a request's output must have: one of the four kinds, or none."""

    json_schema: dict[str, Any] | bool | None = None  # {} or True: any JSON object
    grammar: str | None = None
    grammar_syntax: str = "gbnf"
    regex: str | None = None
    choices: list[str] | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field of the wrong shape."""
        given = [n for n in ("json_schema", "grammar", "regex", "choices") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, grammar, regex, choices (got {', '.join(given)})")
        if self.json_schema is not None and not (self.json_schema is True or isinstance(self.json_schema, dict)):
            raise ValueError("json_schema must be a JSON Schema object, or true for any JSON object")
        if self.grammar_syntax not in GRAMMAR_SYNTAXES:
            raise ValueError(f"grammar_syntax must be one of {', '.join(GRAMMAR_SYNTAXES)} "
                             f"(got {self.grammar_syntax!r})")
        for name in ("grammar", "regex"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if self.choices is not None and (
            not isinstance(self.choices, list) or not self.choices
            or not all(isinstance(c, str) and c for c in self.choices)
        ):
            raise ValueError("choices must be a non-empty list of non-empty strings")

    @property
    def given(self) -> bool:
        return any(getattr(self, n) is not None for n in ("json_schema", "grammar", "regex", "choices"))

    def grammar_text(self, token_id: Callable[[str], int | None], vocab_size: int) -> str:
        """The llguidance grammar of this constraint (``given`` must be true); ``ValueError`` when a
        schema or grammar cannot be read. ``token_id`` and ``vocab_size`` serve GBNF token references."""
        if self.json_schema is not None:
            return json_schema_grammar(self.json_schema)
        if self.grammar is not None:
            if self.grammar_syntax == "lark":
                return LLMatcher.grammar_from_lark(self.grammar)
            return LLMatcher.grammar_from_lark(gbnf_to_lark(self.grammar, token_id, vocab_size))
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        assert self.choices is not None
        return LLMatcher.grammar_from_lark("start: " + " | ".join(lark_string(c) for c in self.choices))


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """A JSON Schema's grammar, written in ``JSON_STYLE``; ``{}`` and ``True`` mean any JSON object."""
    if schema is True or schema == {}:
        schema = {"type": "object"}
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
    except (TypeError, ValueError) as exc:  # not JSON-serializable, or not an object
        raise ValueError(f"json_schema cannot be read: {exc}") from None
