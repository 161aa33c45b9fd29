"""Structured output on the default model (SmolLM2-135M-Instruct): llama.cpp's grammars and tool calls.

A real model ends its replies, so here most outputs finish and every finished one must match; each
output is checked by Python alone (``json``, ``re``, a small parser, ``jsonschema``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.loader.registry import DEFAULT_MODEL

GRAMMARS = Path(__file__).parent / "grammars"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=16, max_seq_len=1024))


CHESS_MOVE = r"(?:(?:[a-h]x)?[a-h][1-8](?:=[NBKQR])?|[NBKQR][a-h]?[1-8]?x?[a-h][1-8]|O-O(?:-O)?)[+#]?"
CHESS = re.compile(rf"1\. {CHESS_MOVE} {CHESS_MOVE}\n(?:[1-9][0-9]?\. {CHESS_MOVE} {CHESS_MOVE}\n)+")
LIST = re.compile("(?:- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n)+")


def arithmetic_ok(text: str) -> bool:
    """llama.cpp's arithmetic.gbnf, by recursive descent: lines of ``expr "=" ws term "\\n"``."""
    pos = 0

    def ws() -> None:
        nonlocal pos
        while pos < len(text) and text[pos] in " \t\n":
            pos += 1

    def term() -> bool:
        nonlocal pos
        if m := re.compile(r"[a-z][a-z0-9_]*|[0-9]+").match(text, pos):
            pos = m.end()
            ws()
            return True
        if text.startswith("(", pos):
            pos += 1
            ws()
            if expr() and text.startswith(")", pos):
                pos += 1
                ws()
                return True
        return False

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "-+*/":
            pos += 1
            if not term():
                return False
        return True

    lines = 0
    while pos < len(text):
        if not (expr() and text.startswith("=", pos)):
            return False
        pos += 1
        ws()
        # ws is greedy here, so the term's trailing white space is all of it: it must end the line.
        if not (term() and text[pos - 1] == "\n"):
            return False
        lines += 1
    return lines > 0


CASES = {
    "json": ("Describe a sword as a JSON object.", lambda t: isinstance(json.loads(t), dict)),
    "chess": ("Write the first moves of a chess game.", lambda t: CHESS.fullmatch(t) is not None),
    "list": ("List three things a traveller needs.", lambda t: LIST.fullmatch(t) is not None),
    "arithmetic": ("Write two equations.", arithmetic_ok),
}


def test_llama_cpp_grammars(engine):
    """json, chess, list and arithmetic from llama.cpp's grammars folder: greedy, sampled and n > 1."""
    reqs, names = [], []
    for name, (question, _) in CASES.items():
        chat = [{"role": "user", "content": question}]
        grammar = (GRAMMARS / f"{name}.gbnf").read_text()
        reqs += [GenerationRequest(messages=chat, grammar=grammar, temperature=0.0, max_new_tokens=96),
                 GenerationRequest(messages=chat, grammar=grammar, temperature=0.7, top_p=0.9, seed=1, n=2,
                                   max_new_tokens=96)]
        names += [name, name]
    finished = {name: 0 for name in CASES}
    for name, r in zip(names, engine.generate(reqs)):
        for out in r.forks or [r]:
            if out.finish_reason == "stop":
                finished[name] += 1
                assert CASES[name][1](out.text), (name, out.text)
                assert out.structure_complete
            else:
                assert out.finish_reason == "length" and not out.structure_complete
    assert all(finished.values()), finished
    assert engine.stats()["kv_blocks_in_use"] == 0


TOOLS = [
    {"name": "sell", "description": "Sell an item to the customer for a price in silver coins.",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["item", "price"],
                    "properties": {"item": {"enum": ["sword", "shield", "bread", "rope"]},
                                   "price": {"type": "integer", "minimum": 1, "maximum": 500}}}},
    {"name": "refuse", "description": "Refuse to trade, and say why.",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["reason"],
                    "properties": {"reason": {"type": "string", "maxLength": 80}}}},
]


@pytest.mark.parametrize("tool_choice", ["required", "refuse"])
def test_tool_call_with_two_tools(engine, tool_choice):
    chat = [{"role": "system", "content": "You are Gilda, a merchant in a village."},
            {"role": "user", "content": "I want to buy a sword. How much is it?"}]
    reqs = [GenerationRequest(messages=chat, tools=TOOLS, tool_choice=tool_choice, temperature=0.7, top_p=0.9,
                              seed=s, max_new_tokens=80) for s in range(3)]
    schemas = {t["name"]: t["parameters"] for t in TOOLS}
    for r in engine.generate(reqs):
        assert r.finish_reason == "stop", r.text
        (call,) = r.tool_calls
        assert tool_choice in ("required", call.name)
        jsonschema.validate(call.arguments, schemas[call.name])
