"""Tool calls: the form follows the chat template, arguments follow each tool's schema, results parse.

Three tiny random chat models differ only in their chat template: ChatML (no tool support: the
documented ``<tool_call>`` form, tools described in the system message), a template that lists tools and
writes ``<tool_call>`` (Qwen and Hermes style), and one in Llama 3.1's JSON style. Whatever nonsense the
random weights prefer, every call must parse and validate against its tool's schema.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from conftest import TINY_CONFIGS
from gllm.constrain import ToolCall
from gllm.constrain.tools import DOCUMENTED, HERMES, LLAMA3, tool_call_format
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from tiny_chat import CHATML, build_chat_model

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nFor each call, write <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n"
    "{% endif %}" + CHATML
)
LLAMA3_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nGiven the following functions, respond with a JSON for a function call. "
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}" + CHATML
)
TOOLS = [
    {"name": "sell", "description": "Sell an item at a price in silver.",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["item", "price"],
                    "properties": {"item": {"enum": ["sword", "shield", "rope"]},
                                   "price": {"type": "integer", "minimum": 1, "maximum": 500}}}},
    {"name": "refuse", "description": "Refuse to trade.",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["reason"],
                    "properties": {"reason": {"type": "string", "maxLength": 12}}}},
]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
CHAT = [{"role": "system", "content": "You are a merchant."}, {"role": "user", "content": "A sword, please."}]


@pytest.fixture(scope="module", params=[("chatml", CHATML), ("hermes", HERMES_TEMPLATE), ("llama3", LLAMA3_TEMPLATE)],
                ids=lambda p: p[0])
def engine(request, tmp_path_factory) -> LLMEngine:
    folder = build_chat_model(tmp_path_factory.mktemp(request.param[0]), request.param[1],
                              **{**TINY_CONFIGS["gqa_tied_llama3"], "max_position_embeddings": 1536})
    return LLMEngine(str(folder), GeneratorParams(max_batch_size=8, max_seq_len=1536), dtype="float32")


def check_call(call: ToolCall, tool_choice: str) -> None:
    assert call.name in SCHEMAS and tool_choice in ("auto", "required", call.name)
    jsonschema.validate(call.arguments, SCHEMAS[call.name])


def test_the_form_follows_the_chat_template(engine):
    want = {CHATML: DOCUMENTED, HERMES_TEMPLATE: HERMES, LLAMA3_TEMPLATE: LLAMA3}[engine.tokenizer.hf.chat_template]
    assert engine.constraints.tool_format == want
    prompt = engine.tokenizer.decode(engine.prompt_ids(GenerationRequest(messages=CHAT, tools=TOOLS)))
    assert '"name": "sell"' in prompt and "Sell an item" in prompt  # the tools reach the model either way
    if want is DOCUMENTED:
        assert prompt.index("You are a merchant.") < prompt.index("<tool_call>")  # one system message
    none = GenerationRequest(messages=CHAT, tools=TOOLS, tool_choice="none")
    plain = engine.tokenizer.decode(engine.prompt_ids(none))
    assert "sell" not in plain


@pytest.mark.parametrize("tool_choice", ["required", "sell", "refuse"])
def test_required_and_named_calls_parse_and_validate(engine, tool_choice):
    reqs = [GenerationRequest(messages=CHAT, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=s,
                              max_new_tokens=120) for s in range(3)]
    reqs.append(GenerationRequest(messages=CHAT, tools=TOOLS, tool_choice=tool_choice, temperature=0.0,
                                  max_new_tokens=120))
    for r in engine.generate(reqs):
        assert r.finish_reason == "stop" and r.structure_complete, r.text
        (call,) = r.tool_calls
        check_call(call, tool_choice)
        fmt = engine.constraints.tool_format
        assert r.text.startswith(fmt.begin) and r.text.endswith(fmt.end)
        assert json.loads(r.text[len(fmt.begin) : len(r.text) - len(fmt.end)]) == {
            "name": call.name, fmt.arguments_key: call.arguments}
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_auto_answers_in_text_or_one_valid_call(engine):
    fmt = engine.constraints.tool_format
    reqs = [GenerationRequest(messages=CHAT, tools=TOOLS, temperature=1.0, seed=s, max_new_tokens=60) for s in range(6)]
    for r in engine.generate(reqs):
        if r.tool_calls:
            (call,) = r.tool_calls
            check_call(call, "auto")
            assert r.finish_reason == "stop" and r.text.endswith(fmt.end)
        elif fmt.begin:
            assert fmt.begin.strip() not in r.text
        else:
            assert not r.text.startswith("{")


def test_parsing_keeps_only_whole_calls():
    text = '<tool_call>\n{"name": "sell", "arguments": {"item": "rope", "price": 3}}\n</tool_call>'
    assert DOCUMENTED.parse("Here. " + text) == [ToolCall("sell", {"item": "rope", "price": 3})]
    assert DOCUMENTED.parse(text[:-5]) == []
    assert DOCUMENTED.parse('<tool_call>{"name": "x"}</tool_call>') == []  # no arguments
    assert LLAMA3.parse('{"name": "refuse", "parameters": {"reason": "no"}}') == [ToolCall("refuse", {"reason": "no"})]
    assert LLAMA3.parse('I cannot. {"name": "refuse"}') == []


def test_template_detection():
    assert tool_call_format(None) is DOCUMENTED
    assert tool_call_format(CHATML) is DOCUMENTED
    assert tool_call_format("{{ '<tool_call>' }}") is DOCUMENTED  # writes the marker but cannot list tools
    assert tool_call_format(HERMES_TEMPLATE) is HERMES
    assert tool_call_format(LLAMA3_TEMPLATE) is LLAMA3
