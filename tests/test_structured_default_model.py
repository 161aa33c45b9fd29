"""Structured output on the default model (SmolLM2-135M-Instruct): llama.cpp's grammars and tool calls.

A real model ends most of its replies; every output is checked by Python alone (``grammar_checks``,
``jsonschema``).
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.loader.registry import DEFAULT_MODEL
from grammar_checks import matches

GRAMMARS = Path(__file__).parent / "grammars"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=16, max_seq_len=1024))


QUESTIONS = {
    "json": "Describe a sword as a JSON object.",
    "chess": "Write the first two moves of a chess game in PGN, one move pair per line.",
    "list": "List three things a traveller needs.",
    "arithmetic": "Write two short equations, one per line, like x = 2.",
}


def test_llama_cpp_grammars(engine):
    """json, chess, list and arithmetic from llama.cpp's grammars folder, greedy, sampled and n > 1: a reply
    that ends matches; one cut by its length limit (this small model loops on some) is a valid start."""
    reqs = []
    for name, question in QUESTIONS.items():
        chat = [{"role": "user", "content": question}]
        grammar = (GRAMMARS / f"{name}.gbnf").read_text()
        reqs += [GenerationRequest(messages=chat, grammar=grammar, temperature=0.0, max_new_tokens=96),
                 GenerationRequest(messages=chat, grammar=grammar, temperature=0.7, top_p=0.9, seed=1, n=2,
                                   max_new_tokens=96)]
    finished = 0
    for name, r in zip([n for n in QUESTIONS for _ in range(2)], engine.generate(reqs)):
        for out in r.forks or [r]:
            if out.finish_reason == "stop":
                finished += 1
                assert matches(name, out.text) and out.structure_complete, (name, out.text)
            else:
                assert out.finish_reason == "length" and not out.structure_complete
                assert matches(name, out.text, prefix=True), (name, out.text)
    assert finished > 0
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
