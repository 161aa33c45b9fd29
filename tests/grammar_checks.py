"""Python's own reading of llama.cpp's json, chess, list and arithmetic grammars, for checking outputs.

``matches(name, text, prefix)``: with ``prefix`` false, ``text`` must be a whole match; with it true, a
match cut short is fine too (what a reply that reached its length limit must be). Chess and list are
regular: the ``regex`` package (a dependency of ``transformers``) matches partially. JSON and
arithmetic are checked by recursive descent, where running out of text means "a prefix".
"""

from __future__ import annotations

import regex

CHESS_MOVE = r"(?:(?:[a-h]x)?[a-h][1-8](?:=[NBKQR])?|[NBKQR][a-h]?[1-8]?x?[a-h][1-8]|O-O(?:-O)?)[+#]?"
CHESS = regex.compile(rf"1\. {CHESS_MOVE} {CHESS_MOVE}\n(?:[1-9][0-9]?\. {CHESS_MOVE} {CHESS_MOVE}\n)+")
LIST = regex.compile("(?:- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n)+")
NUMBER = regex.compile(r"-?(?:[0-9]|[1-9][0-9]{0,15})(?:\.[0-9]+)?(?:[eE][-+]?[0-9][1-9]{0,15})?")
STRING = regex.compile(r'"(?:[^"\\\x7f\x00-\x1f]|\\(?:["\\bfnrt]|u[0-9a-fA-F]{4}))*"')


class Incomplete(Exception):
    """The text ended where the grammar needed more."""


class _Reader:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def peek(self) -> str:
        if self.pos >= len(self.text):
            raise Incomplete
        return self.text[self.pos]

    def token(self, pattern: regex.Pattern) -> bool:
        """Match a regular token here; a token cut off by the end of the text is Incomplete."""
        m = pattern.match(self.text, self.pos, partial=True)
        if m is None:
            return False
        if m.partial:
            raise Incomplete
        self.pos = m.end()
        return True

    def literal(self, s: str) -> bool:
        end = self.text[self.pos : self.pos + len(s)]
        if end != s[: len(end)]:
            return False
        if len(end) < len(s):
            raise Incomplete
        self.pos += len(s)
        return True

    def ws(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def json_ws(self) -> None:
        """json.gbnf's ``ws ::= | " " | "\\n" [ \\t]{0,20}``."""
        if self.text.startswith(" ", self.pos):
            self.pos += 1
        elif self.text.startswith("\n", self.pos):
            self.pos += 1
            start = self.pos
            while self.pos < len(self.text) and self.pos - start < 20 and self.text[self.pos] in " \t":
                self.pos += 1


def _json_value(r: _Reader) -> bool:
    c = r.peek()
    if c in "{[":
        close, r.pos = "}" if c == "{" else "]", r.pos + 1
        r.json_ws()
        if r.literal(close):
            r.json_ws()
            return True
        while True:
            if c == "{":
                if not r.token(STRING):
                    return False
                r.json_ws()
                if not r.literal(":"):
                    return False
                r.json_ws()
            if not _json_value(r):
                return False
            if r.literal(close):
                r.json_ws()
                return True
            if not r.literal(","):
                return False
            r.json_ws()
    ok = r.token(STRING) or r.token(NUMBER) or any(r.literal(w) for w in ("true", "false", "null") if r.peek() == w[0])
    r.json_ws()
    return ok


def _arithmetic(r: _Reader) -> bool:
    def term() -> bool:
        if r.token(regex.compile(r"[a-z][a-z0-9_]*|[0-9]+")):
            r.ws(" \t\n")
            return True
        if r.literal("("):
            r.ws(" \t\n")
            if expr() and r.literal(")"):
                r.ws(" \t\n")
                return True
        return False

    def expr() -> bool:
        if not term():
            return False
        while r.pos < len(r.text) and r.text[r.pos] in "-+*/":
            r.pos += 1
            if not term():
                return False
        return True

    lines = 0
    while r.pos < len(r.text) or not lines:
        if not (expr() and r.literal("=")):
            return False
        r.ws(" \t\n")
        # The term's white space is greedy here, so all of it is the term's: it must end the line.
        if not term():
            return False
        if r.text[r.pos - 1] != "\n":
            if r.pos == len(r.text):
                raise Incomplete
            return False
        lines += 1
    return True


def matches(name: str, text: str, prefix: bool = False) -> bool:
    if name in ("chess", "list"):
        pattern = CHESS if name == "chess" else LIST
        return pattern.fullmatch(text, partial=prefix) is not None
    reader = _Reader(text)
    try:
        if name == "json":
            return reader.peek() == "{" and _json_value(reader) and reader.pos == len(text)
        return _arithmetic(reader)
    except Incomplete:
        return prefix
