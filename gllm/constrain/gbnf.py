"""GBNF (llama.cpp's grammar format) to llguidance's Lark dialect.

llguidance ships a converter, but it turns ``\\U0010FFFF`` and ``\\u00e9`` escapes into text its own
parser rejects (llama.cpp's newer ``json.gbnf`` fails on it), and it does not know llama.cpp's token
syntax (``<[id]>``, ``<name>``, ``!<[id]>``). This one reads both. Its plan:

* parse every rule (``name ::= alternatives``; newlines are plain white space, a rule ends where the
  next ``name ::=`` starts);
* a rule that can be a regular expression (it reaches neither itself nor a token) becomes a Lark
  terminal (an upper-case name), so the lexer matches it as one lexeme, which is what makes masks fast;
* the other rules stay Lark rules, and each run of regular items inside them becomes a helper terminal.

Characters in classes are written as ``\\x{...}`` escapes, so no character of the source can change
the meaning of the regular expression around it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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


# ------------------------------------------------------------------------------------------- emitting
def _children(node: Node) -> list[Node]:
    if isinstance(node, Repeat):
        return [node.item]
    if isinstance(node, Choice):
        return [item for option in node.options for item in option]
    return []


def _walk(node: Node):
    yield node
    for child in _children(node):
        yield from _walk(child)


def regular_rules(rules: dict[str, Choice]) -> set[str]:
    """Rules expressible as one regular expression: they reach no token and not themselves."""
    refs = {name: {n.name for n in _walk(body) if isinstance(n, RuleRef)} for name, body in rules.items()}
    for name, names in refs.items():
        missing = names - rules.keys()
        if missing:
            raise GbnfError(f"GBNF: rule {name!r} refers to undefined rule(s) {', '.join(sorted(missing))}")
    has_token = {name for name, body in rules.items() if any(isinstance(n, TokenRef) for n in _walk(body))}
    regular: set[str] = set()
    changed = True
    while changed:  # a rule is regular once every rule it refers to is (which rules out cycles)
        changed = False
        for name in rules.keys() - regular - has_token:
            if refs[name] <= regular:
                regular.add(name)
                changed = True
    return regular


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
    one = _regex_char
    body = "".join(one(lo) if lo == hi else f"{one(lo)}-{one(hi)}" for lo, hi in node.ranges)
    return f"/[{'^' if node.negated else ''}{body}]/"


class _Emitter:
    def __init__(self, rules: dict[str, Choice], token_id: Callable[[str], int | None], vocab_size: int):
        self.rules = rules
        self.regular = regular_rules(rules)
        self.token_id = token_id
        self.vocab_size = vocab_size
        self.names: dict[str, str] = {}
        self.helpers: list[str] = []
        taken = {"start"} if "root" in self.regular else set()  # then start is the rule naming ROOT
        for name in sorted(rules, key=lambda n: n != "root"):  # the root first: it takes "start" (or ROOT)
            if name == "root":
                base = "ROOT" if name in self.regular else "start"
            else:
                base = re.sub(r"\W", "_", name)
                base = base.upper() if name in self.regular else base.lower()
            unique, i = base, 1
            while unique.lower() in taken:
                i += 1
                unique = f"{base}_{i}"
            taken.add(unique.lower())
            self.names[name] = unique
        self.taken = taken

    def emit(self) -> str:
        lines = ["start: ROOT"] if "root" in self.regular else []  # start must be a rule
        for name, body in self.rules.items():
            lines.append(f"{self.names[name]}: {self.expr(body, terminal=name in self.regular)}")
        return "\n".join(["%llguidance {}", *lines, *self.helpers]) + "\n"

    def expr(self, node: Node, terminal: bool) -> str:
        if isinstance(node, Choice):
            options = [self.sequence(option, terminal) for option in node.options]
            return " | ".join(options)
        return self.item(node, terminal)

    def sequence(self, items: list[Node], terminal: bool) -> str:
        if not items:
            return '""'
        if terminal:
            return " ".join(self.item(i, True) for i in items)
        parts, run = [], []
        for item in items + [None]:  # None flushes the last run
            if item is not None and self.is_regular(item):
                run.append(item)
                continue
            if run:
                parts.append(self.helper(run))
                run = []
            if item is not None:
                parts.append(self.item(item, False))
        return " ".join(parts)

    def is_regular(self, node: Node) -> bool:
        return all(not isinstance(n, TokenRef) and (not isinstance(n, RuleRef) or n.name in self.regular)
                   for n in _walk(node))

    def helper(self, run: list[Node]) -> str:
        """A run of regular items inside a rule: one literal or terminal as it is, else a helper terminal."""
        if len(run) == 1 and isinstance(run[0], (Literal, RuleRef)):
            return self.item(run[0], True)
        name = f"GBNF_TERMINAL_{len(self.helpers)}"
        while name.lower() in self.taken:
            name += "_"
        self.helpers.append(f"{name}: {' '.join(self.item(i, True) for i in run)}")
        return name

    def item(self, node: Node, terminal: bool) -> str:
        if isinstance(node, Literal):
            return lark_string(node.text)
        if isinstance(node, CharClass):
            return _class_regex(node)
        if isinstance(node, RuleRef):
            return self.names[node.name]
        if isinstance(node, TokenRef):
            return self.token(node)
        if isinstance(node, Choice):
            return f"({self.expr(node, terminal)})"
        inner = self.item(node.item, terminal)
        if isinstance(node.item, Repeat):
            inner = f"({inner})"
        if (node.low, node.high) == (0, None):
            return inner + "*"
        if (node.low, node.high) == (1, None):
            return inner + "+"
        if (node.low, node.high) == (0, 1):
            return inner + "?"
        return f"{inner}{{{node.low},{'' if node.high is None else node.high}}}"

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
