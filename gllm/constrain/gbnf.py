"""GBNF (llama.cpp's grammar format) to llguidance's Lark dialect.

llguidance ships a converter, but it turns ``\\U0010FFFF`` and ``\\u00e9`` escapes into text its own
parser rejects, does not know llama.cpp's token syntax (``<[id]>``, ``<name>``, ``!<[id]>``), and folds
every regular rule into one greedy lexeme, which changes what some grammars accept (see
``gbnf_lexing``). Here:

* a regular rule that nothing after it can continue becomes a Lark terminal (an upper-case name),
  matched as one lexeme, which is what keeps masks fast;
* every other rule stays a Lark rule, and inside it each run of regular items becomes one helper
  terminal when what follows cannot continue it, else its items stay separate lexemes (a repeated
  character class then repeats as a rule, one character per lexeme, as llama.cpp would read it).

Characters in classes are written as ``\\x{...}`` escapes, so no character of the source can change the
meaning of the regular expression around it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gllm.constrain.gbnf_lexing import NO_CHARS, Follow, Lexing, overlaps, union
from gllm.constrain.gbnf_syntax import (
    CharClass,
    Choice,
    GbnfError,
    Literal,
    Node,
    Repeat,
    RuleRef,
    TokenRef,
    parse_gbnf,
    walk,
)

__all__ = ["GbnfError", "gbnf_to_lark", "lark_string", "regex_literal"]


def lark_string(text: str) -> str:
    """A Lark string literal matching exactly ``text``."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _regex_char(c: int) -> str:
    return chr(c) if chr(c).isascii() and chr(c).isalnum() else f"\\x{{{c:x}}}"


def regex_literal(text: str) -> str:
    """A regular expression (Rust syntax) matching exactly ``text``, safe inside Lark's ``/.../``."""
    return "".join(_regex_char(ord(ch)) for ch in text)


def _class_regex(node: CharClass) -> str:
    body = "".join(_regex_char(lo) if lo == hi else f"{_regex_char(lo)}-{_regex_char(hi)}" for lo, hi in node.ranges)
    return f"/[{'^' if node.negated else ''}{body}]/"


def _repeat_suffix(node: Repeat) -> str:
    if (node.low, node.high) == (0, None):
        return "*"
    if (node.low, node.high) == (1, None):
        return "+"
    if (node.low, node.high) == (0, 1):
        return "?"
    return f"{{{node.low},{'' if node.high is None else node.high}}}"


class _Emitter:
    def __init__(self, rules: dict[str, Choice], token_id: Callable[[str], int | None], vocab_size: int):
        self.rules = rules
        self.lexing = Lexing(rules)
        self.terminals = self.lexing.terminal_rules
        self.token_id = token_id
        self.vocab_size = vocab_size
        self.helpers: list[str] = []
        self.names: dict[str, str] = {}
        self.taken = {"start"} if "root" in self.terminals else set()  # then start is the rule naming ROOT
        for name in sorted(rules, key=lambda n: n != "root"):  # the root first: it takes "start" (or ROOT)
            if name == "root":
                base = "ROOT" if name in self.terminals else "start"
            else:
                base = re.sub(r"\W", "_", name)
                base = base.upper() if name in self.terminals else base.lower()
            self.names[name] = self.fresh(base)

    def fresh(self, base: str) -> str:
        unique, i = base, 1
        while unique.lower() in self.taken:
            i += 1
            unique = f"{base}_{i}"
        self.taken.add(unique.lower())
        return unique

    def emit(self) -> str:
        lines = ["start: ROOT"] if "root" in self.terminals else []  # start must be a rule
        for name, body in self.rules.items():
            if name in self.terminals:
                lines.append(f"{self.names[name]}: {self.regex(body)}")
            else:
                lines.append(f"{self.names[name]}: {self.rule_choice(body, (NO_CHARS, True), name)}")
        return "\n".join(["%llguidance {}", *lines, *self.helpers]) + "\n"

    # ------------------------------------------------------------------- inside a terminal: a regex
    def regex(self, node: Choice | list[Node]) -> str:
        """Alternatives, or a sequence, as (Lark terminal) regex syntax."""
        if isinstance(node, Choice):
            return " | ".join(self.regex(option) for option in node.options)
        return " ".join(self.regex_item(item) for item in node) if node else '""'

    def regex_item(self, node: Node) -> str:
        if isinstance(node, RuleRef):
            if node.name in self.terminals:
                return self.names[node.name]
            return f"({self.regex(self.rules[node.name])})"  # a regular rule that is a Lark rule elsewhere
        if isinstance(node, Repeat):
            inner = self.regex_item(node.item)
            return (f"({inner})" if isinstance(node.item, Repeat) else inner) + _repeat_suffix(node)
        return self.atom(node)

    def atom(self, node: Node) -> str:
        if isinstance(node, Literal):
            return lark_string(node.text)
        if isinstance(node, CharClass):
            return _class_regex(node)
        if isinstance(node, Choice):
            return f"({self.regex(node)})"
        assert isinstance(node, TokenRef), node
        return self.token(node)

    # ---------------------------------------------------------------------- inside a rule: lexemes
    def rule_choice(self, node: Choice, after: Follow, rule: str) -> str:
        return " | ".join(self.rule_sequence(option, after, rule) for option in node.options)

    def rule_sequence(self, items: list[Node], after: Follow, rule: str) -> str:
        if not items:
            return '""'
        parts: list[str] = []
        run: list[tuple[Node, Follow]] = []
        for item, follow in [*zip(items, self.lexing.follows(items, after)), (None, after)]:
            if item is not None and self.is_regular(item):
                run.append((item, follow))
                continue
            if run:
                parts.append(self.lexemes(run, rule))
                run = []
            if item is not None:
                parts.append(self.rule_item(item, follow, rule))
        return " ".join(parts)

    def lexemes(self, run: list[tuple[Node, Follow]], rule: str) -> str:
        """Regular items in a row: one lexeme when what follows cannot continue them, else each apart."""
        items = [item for item, _ in run]
        if overlaps(self.lexing.cont(items), self.lexing.here(run[-1][1], rule)):
            return " ".join(self.rule_item(item, follow, rule) for item, follow in run)
        if len(items) == 1 and (isinstance(items[0], Literal) or
                                isinstance(items[0], RuleRef) and items[0].name in self.terminals):
            return self.regex_item(items[0])
        name = self.fresh("GBNF_TERMINAL")
        self.helpers.append(f"{name}: {self.regex(items)}")
        return name

    def rule_item(self, node: Node, after: Follow, rule: str) -> str:
        if isinstance(node, RuleRef):
            return self.names[node.name]
        if isinstance(node, Choice):
            return f"({self.rule_choice(node, after, rule)})"
        if isinstance(node, Repeat):
            again = self.lexing.first(node.item) if node.high is None or node.high > 1 else NO_CHARS
            inner = self.rule_sequence([node.item], (union(after[0], again), after[1]), rule)
            return f"({inner}){_repeat_suffix(node)}"
        return self.atom(node)

    def is_regular(self, node: Node) -> bool:
        return all(not isinstance(n, TokenRef) and (not isinstance(n, RuleRef) or n.name in self.lexing.regular)
                   for n in walk(node))

    def token(self, node: TokenRef) -> str:
        if not node.negated:
            return f"<{node.spec}>"
        match = re.fullmatch(r"\[(\d+)\]", node.spec)
        tid = int(match.group(1)) if match else self.token_id(f"<{node.spec}>")
        if tid is None or not 0 <= tid < self.vocab_size:
            raise GbnfError(f"GBNF: no token <{node.spec}> in this model's vocabulary")
        ranges = [(lo, hi) for lo, hi in ((0, tid - 1), (tid + 1, self.vocab_size - 1)) if lo <= hi]
        return "<[" + ",".join(f"{lo}-{hi}" for lo, hi in ranges) + "]>"


def gbnf_to_lark(text: str, token_id: Callable[[str], int | None] = lambda _: None, vocab_size: int = 0) -> str:
    """Lark (llguidance's dialect) for a GBNF grammar. ``token_id`` maps a special token's text to its id,
    for ``!<name>``; ``vocab_size`` bounds the tokens a negated token reference allows."""
    return _Emitter(parse_gbnf(text), token_id, vocab_size).emit()
