"""Structured output through ``gllm serve``, on the raw protocol: the generate fields, ``tool_calls`` and
``structure_complete`` on ``done``, and refusals (bad schemas and grammars, the grammar limits) that leave
the runtime serving with no KV block held."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from conftest import TINY_CONFIGS
from gllm.runtime.limits import LIMIT_FLAGS
from gllm.runtime.protocol import encode
from runtime_fixtures import dealer_left_idle, read_stream, recv, request, start_server
from tiny_chat import build_chat_model

GRAMMAR_SIZE = 100
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["say", "mood"],
          "properties": {"say": {"type": "string", "maxLength": 12}, "mood": {"enum": ["calm", "angry"]}}}
TOOLS = [{"name": "sell", "description": "Sell an item.",
          "parameters": {"type": "object", "required": ["item"], "additionalProperties": False,
                         "properties": {"item": {"enum": ["sword", "rope"]}}}},
         {"name": "wave", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = build_chat_model(tmp_path_factory.mktemp("tiny-structured"),
                              **{**TINY_CONFIGS["gqa_tied_llama3"], "max_position_embeddings": 1024})
    srv = start_server(folder, tmp_path_factory.mktemp("serve-log"), "--max-seq-len", "1024",
                       "--max-grammar-size", str(GRAMMAR_SIZE), "--dtype", "float32")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture
def sock(server):
    with dealer_left_idle(server.endpoint, timeout=60) as s:
        yield s


def generate(rid, **fields) -> dict:
    return {"type": "generate", "id": rid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80,
            "temperature": 1.0, "seed": 5, **fields}


def done(sock, message) -> tuple[list[dict], dict]:
    sock.send(encode(message))
    tokens, end = read_stream(sock)
    assert end["type"] == "done", end
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == end["text"]
    return tokens, end


@pytest.mark.parametrize("schema", [SCHEMA, json.dumps(SCHEMA)], ids=["map", "json-text"])
def test_json_schema(sock, schema):
    _, end = done(sock, generate("j", json_schema=schema))
    assert end["finish_reason"] == "stop" and end["structure_complete"] is True
    jsonschema.validate(json.loads(end["text"]), SCHEMA)
    assert "tool_calls" not in end


def test_grammar_regex_and_choices(sock):
    _, end = done(sock, generate("g", grammar='root ::= "go " ("north" | "south")'))
    assert end["text"] in ("go north", "go south") and end["structure_complete"]
    _, end = done(sock, generate("l", grammar='start: "x" /[0-9]{2}/', grammar_syntax="lark"))
    assert len(end["text"]) == 3 and end["text"][0] == "x" and end["text"][1:].isdigit()
    _, end = done(sock, generate("r", regex="[a-c]{4}"))
    assert len(end["text"]) == 4 and set(end["text"]) <= set("abc")
    _, end = done(sock, generate("c", choices=["yes", "no"]))
    assert end["text"] in ("yes", "no")


def test_tool_calls_on_done(sock):
    for choice in ("required", "sell"):
        _, end = done(sock, generate("t", tools=TOOLS, tool_choice=choice))
        (call,) = end["tool_calls"]
        assert call["name"] in ("sell", "wave") and choice in ("required", call["name"])
        assert isinstance(call["arguments"], dict)
        if call["name"] == "sell":
            assert call["arguments"]["item"] in ("sword", "rope")
    _, end = done(sock, generate("n", tools=TOOLS, tool_choice="none", max_tokens=3))
    assert "tool_calls" not in end and "structure_complete" not in end


def test_length_cut_says_incomplete(sock):
    schema = {"type": "object", "properties": {"say": {"type": "string", "minLength": 50}}, "required": ["say"]}
    tokens, end = done(sock, generate("cut", json_schema=schema, max_tokens=5))
    assert end["finish_reason"] == "length" and end["structure_complete"] is False and len(tokens) == 5


@pytest.mark.parametrize("fields, code, words", [
    (dict(json_schema={"type": "nope"}), "bad_request", "does not compile"),
    (dict(json_schema="{not json"), "bad_request", "'json_schema' is not valid JSON text"),
    (dict(json_schema=5), "bad_request", "'json_schema' must be a JSON Schema"),
    (dict(grammar="root ::= ("), "bad_request", "GBNF line 1"),
    (dict(grammar="x", grammar_syntax="yacc"), "bad_request", "'grammar_syntax' must be one of 'gbnf', 'lark'"),
    (dict(regex="[z-a]"), "bad_request", "does not compile"),
    (dict(choices=[]), "bad_request", "'choices' must not be empty"),
    (dict(choices=["a"], regex="a"), "bad_request", "at most one"),
    (dict(tools=[{"name": "a", "params": {}}]), "bad_request", "unknown field string 'params'"),
    (dict(tools=TOOLS, tool_choice="fly"), "bad_request", "tool_choice"),
    (dict(json_schema={"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60)}}),
     "too_long", "max_grammar_size"),
])
def test_refusals_change_nothing(sock, fields, code, words):
    reply = request(sock, generate("bad", **fields))
    assert reply["type"] == "error" and reply["code"] == code and reply["id"] == "bad", reply
    assert words in reply["message"], reply
    if code == "too_long":
        assert LIMIT_FLAGS["max_grammar_size"] in reply["message"] and str(GRAMMAR_SIZE) in reply["message"]
    assert request(sock, {"type": "ping", "id": "after"}) == {"type": "pong", "id": "after"}
    _, end = done(sock, generate("bad", choices=["fine"]))  # the id is free again, the runtime serves on
    assert end["text"] == "fine"


def test_info_reports_the_grammar_limits(sock):
    limits = request(sock, {"type": "info", "id": 1})["limits"]
    assert limits["max_grammar_size"] == GRAMMAR_SIZE and limits["grammar_fuel"] == 1_000_000


def test_cancel_mid_structure(sock):
    long = {"type": "object", "properties": {"say": {"type": "string", "minLength": 300}}, "required": ["say"]}
    sock.send(encode(generate("c", json_schema=long, max_tokens=400)))
    assert recv(sock)["type"] == "token"
    sock.send(encode({"type": "cancel", "id": "c"}))
    _, end = read_stream(sock)
    assert end["type"] == "done" and end["finish_reason"] == "cancelled" and end["structure_complete"] is False


def test_python_clients(server):
    """``Client`` and ``AsyncClient`` send the fields and read ``tool_calls`` and ``structure_complete``."""
    from gllm.client import AsyncClient, Client, ToolCall

    chat = [{"role": "user", "content": "Hi"}]
    with Client(server.endpoint, timeout=120) as client:
        reply = client.complete(messages=chat, json_schema=SCHEMA, temperature=1.0, seed=3, max_tokens=80)
        assert reply.structure_complete is True and reply.tool_calls == []
        jsonschema.validate(json.loads(reply.text), SCHEMA)
        call = client.complete(messages=chat, tools=TOOLS, tool_choice="sell", seed=3, max_tokens=80)
        assert call.tool_calls == [ToolCall("sell", call.tool_calls[0].arguments)]
        assert call.tool_calls[0].arguments["item"] in ("sword", "rope")
        plain = client.complete(messages=chat, max_tokens=2)
        assert plain.structure_complete is None

    async def run():
        async with AsyncClient(server.endpoint, timeout=120) as client:
            return await asyncio.gather(
                client.complete(messages=chat, choices=["left", "right"], temperature=1.0, seed=1),
                client.complete(messages=chat, regex="[0-9]{3}", temperature=1.0, seed=2),
                client.complete(messages=chat, grammar='start: "a" | "b"', grammar_syntax="lark", seed=3))

    left_right, digits, ab = asyncio.run(run())
    assert left_right.text in ("left", "right") and left_right.structure_complete
    assert len(digits.text) == 3 and digits.text.isdigit()
    assert ab.text in ("a", "b")
