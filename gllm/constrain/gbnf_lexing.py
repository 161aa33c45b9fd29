"""Where a GBNF grammar may be cut into greedy lexemes without changing what it accepts.

llama.cpp matches GBNF character by character, keeping every way to parse alive. llguidance splits a
grammar into lexemes (regular expressions) and a lexeme is greedy: it takes a character it can take. So
``num ::= [0-9]+ ws`` with ``ws ::= [ \\t\\n]*``, followed by ``"\\n"`` (llama.cpp's arithmetic.gbnf), would
swallow the newline into ``num`` as one lexeme and never end a line. A part of the grammar can be one
lexeme only when what may follow it can never continue it.

For that this module computes, over character sets: ``first`` (characters a non-empty match can start
with), ``nullable``, ``follow`` (characters that can come after a rule), and ``cont`` (characters that
can extend a complete match of a part into a longer one; an over-approximation, which only costs speed).
"""

from __future__ import annotations

from gllm.constrain.gbnf_syntax import CharClass, Choice, GbnfError, Literal, Node, Repeat, RuleRef, TokenRef, walk

Chars = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges
NO_CHARS: Chars = ()
MAX_CHAR = 0x10FFFF


def union(*sets: Chars) -> Chars:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(r for s in sets for r in s):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def overlaps(a: Chars, b: Chars) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def class_chars(node: CharClass) -> Chars:
    chars = union(tuple(node.ranges))
    if not node.negated:
        return chars
    gaps, start = [], 0
    for lo, hi in chars:
        if lo > start:
            gaps.append((start, lo - 1))
        start = hi + 1
    return tuple(gaps + ([(start, MAX_CHAR)] if start <= MAX_CHAR else []))


def regular_rules(rules: dict[str, Choice]) -> set[str]:
    """Rules expressible as one regular expression: they reach no token and not themselves."""
    refs = {name: {n.name for n in walk(body) if isinstance(n, RuleRef)} for name, body in rules.items()}
    for name, names in refs.items():
        missing = names - rules.keys()
        if missing:
            raise GbnfError(f"GBNF: rule {name!r} refers to undefined rule(s) {', '.join(sorted(missing))}")
    has_token = {name for name, body in rules.items() if any(isinstance(n, TokenRef) for n in walk(body))}
    regular: set[str] = set()
    changed = True
    while changed:  # a rule is regular once every rule it refers to is (which rules out cycles)
        changed = False
        for name in rules.keys() - regular - has_token:
            if refs[name] <= regular:
                regular.add(name)
                changed = True
    return regular


Follow = tuple[Chars, bool]  # characters that may come next, and whether the enclosing rule's follow may too


class Lexing:
    """The sets above for one grammar, and the answer to "may this be one lexeme here?"."""

    def __init__(self, rules: dict[str, Choice]):
        self.rules = rules
        self.regular = regular_rules(rules)
        self._nullable = {name: False for name in rules}
        self._first = {name: NO_CHARS for name in rules}
        self._fixpoint(lambda: [(self._nullable, n, self.nullable(b)) for n, b in rules.items()])
        self._fixpoint(lambda: [(self._first, n, self.first(b)) for n, b in rules.items()])
        self.follow = {name: NO_CHARS for name in rules}
        self._fixpoint(self._follow_updates)
        self.terminal_rules = {r for r in self.regular if not overlaps(self.cont(rules[r]), self.follow[r])}

    @staticmethod
    def _fixpoint(updates) -> None:
        changed = True
        while changed:
            changed = False
            for table, name, value in updates():
                if table[name] != value:
                    table[name], changed = value, True

    def nullable(self, node: Node | list[Node]) -> bool:
        if isinstance(node, list):
            return all(self.nullable(item) for item in node)
        if isinstance(node, Literal):
            return node.text == ""
        if isinstance(node, RuleRef):
            return self._nullable[node.name]
        if isinstance(node, Choice):
            return any(self.nullable(option) for option in node.options)
        if isinstance(node, Repeat):
            return node.low == 0 or self.nullable(node.item)
        return False  # a character class or a token

    def first(self, node: Node | list[Node]) -> Chars:
        if isinstance(node, list):
            sets = []
            for item in node:
                sets.append(self.first(item))
                if not self.nullable(item):
                    break
            return union(*sets)
        if isinstance(node, Literal):
            return ((ord(node.text[0]),) * 2,) if node.text else NO_CHARS
        if isinstance(node, CharClass):
            return class_chars(node)
        if isinstance(node, RuleRef):
            return self._first[node.name]
        if isinstance(node, Choice):
            return union(*(self.first(option) for option in node.options))
        if isinstance(node, Repeat):
            return self.first(node.item) if node.high != 0 else NO_CHARS
        return NO_CHARS  # a token is not characters

    def cont(self, node: Node | list[Node]) -> Chars:
        """Characters that may extend a complete match of a regular part (never called on a recursive one)."""
        if isinstance(node, list):
            if not node:
                return NO_CHARS
            last = node[-1]
            if not self.nullable(last):
                return self.cont(last)
            return union(self.cont(last), self.first(last), self.cont(node[:-1]))
        if isinstance(node, RuleRef):
            return self.cont(self.rules[node.name])
        if isinstance(node, Choice):
            options = [self.cont(option) for option in node.options]
            if len(node.options) > 1:  # one option's match may be the start of another's
                options += [self.chars(option) for option in node.options]
            return union(*options)
        if isinstance(node, Repeat):
            more = node.high is None or node.high > max(node.low, 1) or node.low == 0
            return union(self.cont(node.item), self.first(node.item) if more else NO_CHARS)
        return NO_CHARS  # a literal, a class or a token: nothing extends a complete match

    def chars(self, node: Node | list[Node]) -> Chars:
        """Every character a match of a regular part may contain."""
        nodes = node if isinstance(node, list) else [node]
        sets = []
        for item in nodes:
            for n in walk(item):
                if isinstance(n, Literal):
                    sets.append(tuple((ord(c), ord(c)) for c in n.text))
                elif isinstance(n, CharClass):
                    sets.append(class_chars(n))
                elif isinstance(n, RuleRef):
                    sets.append(self.chars(self.rules[n.name]))
        return union(*sets)

    def _follow_updates(self):
        updates: dict[str, Chars] = {name: self.follow[name] for name in self.rules}
        for name, body in self.rules.items():
            self._visit(body, (NO_CHARS, True), name, updates)
        return [(self.follow, name, value) for name, value in updates.items()]

    def _visit(self, node: Node, after: Follow, rule: str, updates: dict[str, Chars]) -> None:
        if isinstance(node, RuleRef):
            updates[node.name] = union(updates[node.name], self.here(after, rule))
        elif isinstance(node, Choice):
            for option in node.options:
                self.visit_sequence(option, after, rule, updates)
        elif isinstance(node, Repeat):
            again = self.first(node.item) if node.high is None or node.high > 1 else NO_CHARS
            self._visit(node.item, (union(after[0], again), after[1]), rule, updates)

    def visit_sequence(self, items: list[Node], after: Follow, rule: str, updates: dict[str, Chars]) -> None:
        for item, follow in zip(items, self.follows(items, after)):
            self._visit(item, follow, rule, updates)

    def follows(self, items: list[Node], after: Follow) -> list[Follow]:
        """What may follow each item of a sequence that ``after`` follows."""
        out: list[Follow] = []
        for item in reversed(items):
            out.append(after)
            nullable = self.nullable(item)
            after = (union(self.first(item), after[0] if nullable else NO_CHARS), after[1] and nullable)
        return out[::-1]

    def here(self, after: Follow, rule: str) -> Chars:
        """The characters ``after`` stands for inside ``rule``."""
        return union(after[0], self.follow[rule]) if after[1] else after[0]
