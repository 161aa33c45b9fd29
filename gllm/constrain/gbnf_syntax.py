"""GBNF (llama.cpp's grammar format): its syntax tree and parser.

Rules are ``name ::= alternatives``; newlines are plain white space (a rule ends where the next
``name ::=`` starts). Literals and classes take llama.cpp's escapes (``\\x``, ``\\u``, ``\\U``, ``\\t``,
``\\n``, ...), and token references its token syntax (``<[id]>``, ``<name>``, negated with ``!``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field


class GbnfError(ValueError):
    """The text is not GBNF this converter understands; the message says where."""


# ------------------------------------------------------------------------------------------ syntax tree
@dataclass
class Literal:
    text: str


@dataclass
class CharClass:
    ranges: list[tuple[int, int]]
    negated: bool = False


@dataclass
class RuleRef:
    name: str


@dataclass
class TokenRef:
    spec: str  # "[12]" or "|im_end|", as written between < and >
    negated: bool = False


@dataclass
class Repeat:
    item: Node
    low: int
    high: int | None  # None: unbounded


@dataclass
class Choice:
    options: list[list[Node]] = field(default_factory=list)  # alternatives, each a sequence


Node = Literal | CharClass | RuleRef | TokenRef | Repeat | Choice
ANY_CHAR = CharClass([(0, 0x10FFFF)])

_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_RULE_START = re.compile(r"[a-zA-Z0-9_-]+\s*::=")
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "/": "/"}


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> GbnfError:
        line = self.text.count("\n", 0, self.pos) + 1
        snippet = self.text[self.pos : self.pos + 20].split("\n")[0]
        return GbnfError(f"GBNF line {line}: {what} at {snippet!r}")

    def skip(self) -> None:
        """White space (newlines included) and # comments."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t\r\n":
                self.pos += 1
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def at_rule_start(self) -> bool:
        return _RULE_START.match(self.text, self.pos) is not None

    def rules(self) -> dict[str, Choice]:
        rules: dict[str, Choice] = {}
        self.skip()
        while self.pos < len(self.text):
            match = _NAME.match(self.text, self.pos)
            if not match or not self.at_rule_start():
                raise self.fail("expected a rule (name ::= ...)")
            name = match.group()
            if name in rules:
                raise self.fail(f"rule {name!r} is defined twice")
            self.pos = self.text.index("::=", self.pos) + 3
            rules[name] = self.alternatives(nested=False)
        if "root" not in rules:
            raise GbnfError("GBNF: the grammar has no 'root' rule")
        return rules

    def alternatives(self, nested: bool) -> Choice:
        choice = Choice([self.sequence(nested)])
        while self.peek() == "|":
            self.pos += 1
            choice.options.append(self.sequence(nested))
        return choice

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos : self.pos + 1]

    def sequence(self, nested: bool) -> list[Node]:
        items: list[Node] = []
        while True:
            c = self.peek()
            if c in ("", "|") or (c == ")" and nested) or (not nested and self.at_rule_start()):
                return items
            items.append(self.postfix(self.atom()))

    def atom(self) -> Node:
        c = self.text[self.pos]
        if c == '"':
            return self.literal()
        if c == "[":
            return self.char_class()
        if c == "(":
            self.pos += 1
            inner = self.alternatives(nested=True)
            if self.peek() != ")":
                raise self.fail("expected ')'")
            self.pos += 1
            return inner
        if c == ".":
            self.pos += 1
            return ANY_CHAR
        if c == "!" or c == "<":
            negated = c == "!"
            self.pos += negated
            end = self.text.find(">", self.pos)
            if self.text[self.pos : self.pos + 1] != "<" or end < 0:
                raise self.fail("expected a token such as <[12]> or <|end|>")
            spec, self.pos = self.text[self.pos + 1 : end], end + 1
            return TokenRef(spec, negated)
        match = _NAME.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            return RuleRef(match.group())
        raise self.fail("unexpected character")

    def postfix(self, item: Node) -> Node:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in "*+?":
                self.pos += 1
                item = Repeat(item, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "{":
                match = re.compile(r"\{\s*(\d+)\s*(,\s*(\d*)\s*)?\}").match(self.text, self.pos)
                if not match:
                    raise self.fail("bad repetition {m,n}")
                self.pos = match.end()
                low = int(match.group(1))
                high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else None)
                if high is not None and high < low:
                    raise self.fail(f"repetition {{{low},{high}}} has its maximum below its minimum")
                item = Repeat(item, low, high)
            else:
                return item
        return item

    def char(self, end: str) -> int:
        """One character of a literal or class, escapes decoded, as a code point."""
        text = self.text
        if self.pos >= len(text) or text[self.pos] == "\n":
            raise self.fail(f"unterminated {'literal' if end == chr(34) else 'character class'}")
        c = text[self.pos]
        if c != "\\":
            self.pos += 1
            return ord(c)
        kind = text[self.pos + 1 : self.pos + 2]
        digits = {"x": 2, "u": 4, "U": 8}.get(kind)
        if digits:
            hex_digits = text[self.pos + 2 : self.pos + 2 + digits]
            if len(hex_digits) != digits or not all(h in "0123456789abcdefABCDEF" for h in hex_digits):
                raise self.fail(f"\\{kind} needs {digits} hex digits")
            self.pos += 2 + digits
            value = int(hex_digits, 16)
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise self.fail(f"\\{kind}{hex_digits} is not a Unicode character")
            return value
        if kind in _SIMPLE_ESCAPES:
            self.pos += 2
            return ord(_SIMPLE_ESCAPES[kind])
        raise self.fail(f"unknown escape \\{kind}")

    def literal(self) -> Literal:
        self.pos += 1
        chars = []
        while self.text[self.pos : self.pos + 1] != '"':
            chars.append(chr(self.char('"')))
        self.pos += 1
        return Literal("".join(chars))

    def char_class(self) -> CharClass:
        self.pos += 1
        negated = self.text[self.pos : self.pos + 1] == "^"
        self.pos += negated
        ranges = []
        while self.text[self.pos : self.pos + 1] != "]":
            low = self.char("]")
            high = low
            if self.text[self.pos : self.pos + 1] == "-" and self.text[self.pos + 1 : self.pos + 2] != "]":
                self.pos += 1
                high = self.char("]")
            if high < low:
                raise self.fail("a character range runs backwards")
            ranges.append((low, high))
        self.pos += 1
        return CharClass(ranges, negated)


def parse_gbnf(text: str) -> dict[str, Choice]:
    """The rules of a GBNF grammar, by name; raises ``GbnfError``."""
    return _Parser(text).rules()


def children(node: Node) -> list[Node]:
    if isinstance(node, Repeat):
        return [node.item]
    if isinstance(node, Choice):
        return [item for option in node.options for item in option]
    return []


def walk(node: Node) -> Iterator[Node]:
    """The node and every node inside it."""
    yield node
    for child in children(node):
        yield from walk(child)
