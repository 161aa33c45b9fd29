"""Every limit on what a client controls, against a real ``gllm serve`` with small limits: at the limit a
request is served, beyond it the reply is an error naming the limit and its option, and the runtime goes on."""

from __future__ import annotations

import pytest
import zmq

from gllm.runtime.limits import LIMIT_FLAGS, ServerLimits
from gllm.runtime.protocol import encode
from runtime_fixtures import (build_tiny_llama, dealer, dealer_left_idle, read_stream, recv, request, start_server,
                              wait_until)
from test_tokenizer import build_sentencepiece_tokenizer

LIMITS = {"max_message_bytes": 2048, "max_open_requests": 3, "max_nesting_depth": 4, "max_prompt_tokens": 32,
          "max_completion_tokens": 50, "max_stop_strings": 2, "max_stop_chars": 5, "max_candidates": 3,
          "max_candidate_tokens": 4, "max_clients": 64}
CHAT = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def flags(limits: dict[str, int]) -> list[str]:
    return [arg for name, value in limits.items() for arg in (LIMIT_FLAGS[name], str(value))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-limits"), vocab_size=320)
    build_sentencepiece_tokenizer(folder, chat_template=CHAT)  # text prompts and string candidates
    return folder


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = start_server(model, tmp_path_factory.mktemp("limits-log"), *flags(LIMITS))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture
def sock(server):
    with dealer_left_idle(server.endpoint, timeout=30) as s:
        yield s


def refused(sock: zmq.Socket, message: dict | bytes, code: str, limit: str) -> dict:
    """Send ``message``; its reply must be an ``error`` with ``code`` naming ``limit`` and its option."""
    sock.send(message if isinstance(message, bytes) else encode(message))
    reply = recv(sock)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert limit in reply["message"] and LIMIT_FLAGS[limit] in reply["message"], reply
    assert str(LIMITS[limit]) in reply["message"], reply
    assert request(sock, {"type": "ping", "id": "after"}) == {"type": "pong", "id": "after"}  # still serving
    return reply


def generate(**fields) -> dict:
    return {"type": "generate", "id": "g", "prompt_token_ids": [1, 2, 3], "max_tokens": 2, **fields}


def served(sock: zmq.Socket, message: dict) -> dict:
    sock.send(encode(message))
    if message["type"] == "score":
        reply = recv(sock)
    else:
        _, reply = read_stream(sock)
    assert reply["type"] in ("done", "scores"), reply
    return reply


def test_info_reports_every_limit(sock):
    limits = request(sock, {"type": "info", "id": 1})["limits"]
    assert {name: limits[name] for name in LIMITS} == LIMITS
    assert set(LIMIT_FLAGS) <= set(limits) and limits["max_logprobs"] == 20


def test_message_size(sock):
    big = generate(prompt="a" * 2100)
    reply = refused(sock, big, "too_long", "max_message_bytes")
    assert reply["id"] is None  # an oversized message is not read
    assert len(encode(generate(stop=["abcde"] * 2, prompt_token_ids=[300] * 32))) < 2048
    served(sock, generate(stop=["abcde"] * 2, prompt_token_ids=[300] * 32))


def test_nesting_depth(sock):
    assert refused(sock, generate(prompt=[[[["x"]]]]), "bad_request", "max_nesting_depth")["id"] == "g"
    assert refused(sock, b"\x91" * 2000 + b"\xc0", "bad_request", "max_nesting_depth")["id"] is None
    assert refused(sock, b"\x81\xa1a" * 600 + b"\xc0", "bad_request", "max_nesting_depth")["id"] is None
    # At the limit the message is read, so its own problems are what the error says.
    reply = request(sock, generate(prompt=[["x"]]))
    assert reply["code"] == "bad_request" and "'prompt' must be a string" in reply["message"]


def test_prompt_tokens(sock):
    refused(sock, generate(prompt_token_ids=[7] * 33), "too_long", "max_prompt_tokens")
    served(sock, generate(prompt_token_ids=[7] * 32))
    text = generate(prompt_token_ids=None, prompt="the " * 40)  # about 80 tokens once tokenized
    refused(sock, text, "too_long", "max_prompt_tokens")
    chat = generate(prompt_token_ids=None, messages=[{"role": "user", "content": "hello " * 20}])
    refused(sock, chat, "too_long", "max_prompt_tokens")
    reply = served(sock, generate(prompt_token_ids=None, prompt="the cat"))
    assert 0 < reply["usage"]["prompt_tokens"] <= 32


def test_completion_tokens(sock):
    refused(sock, generate(max_tokens=51), "too_long", "max_completion_tokens")
    reply = served(sock, generate(max_tokens=50, ignore_eos=True))
    assert reply["usage"]["completion_tokens"] == 50


def test_stop_strings(sock):
    refused(sock, generate(stop=["a", "b", "c"]), "bad_request", "max_stop_strings")
    refused(sock, generate(stop=["abcdef"]), "bad_request", "max_stop_chars")
    served(sock, generate(stop=["abcde", "x"]))


def test_candidates(sock):
    score = {"type": "score", "id": "s", "prompt_token_ids": [1, 2]}
    refused(sock, {**score, "candidates": [[1], [2], [3], [4]]}, "bad_request", "max_candidates")
    refused(sock, {**score, "candidates": [[1], [1, 2, 3, 4, 5]]}, "too_long", "max_candidate_tokens")
    refused(sock, {**score, "candidates": ["a", "the the the the the"]}, "too_long", "max_candidate_tokens")
    reply = served(sock, {**score, "candidates": [[1], [1, 2, 3, 4], "the"]})
    assert [len(c["token_ids"]) for c in reply["candidates"]][:2] == [1, 4]


def test_open_requests(sock):
    long = {"type": "generate", "prompt_token_ids": [1], "max_tokens": 50, "ignore_eos": True}
    for i in range(3):
        sock.send(encode({**long, "id": i}))
    sock.send(encode({**long, "id": 3}))
    while True:
        reply = recv(sock)
        if reply["type"] == "error":
            break
        assert reply["type"] == "token"  # streams of the three may arrive first
    assert reply["id"] == 3 and reply["code"] == "overloaded", reply
    assert "max_open_requests" in reply["message"] and "--max-open-requests" in reply["message"]
    for i in range(3):
        sock.send(encode({"type": "cancel", "id": i}))
    ended = set()
    while len(ended) < 3:
        reply = recv(sock)
        if reply["type"] == "done":
            ended.add(reply["id"])
    served(sock, generate())


def test_clients_at_once(model, tmp_path):
    srv = start_server(model, tmp_path, "--max-clients", "2")
    socks = [dealer(srv.endpoint) for _ in range(3)]
    try:
        def pong(s: zmq.Socket, rid: str) -> bool:
            return request(s, {"type": "ping", "id": rid})["type"] == "pong"

        # The probe socket of start_server may still count until the runtime sees it close.
        wait_until(lambda: pong(socks[0], "a"), timeout=120)
        wait_until(lambda: pong(socks[1], "b"), timeout=120)
        reply = request(socks[2], {"type": "generate", "id": "c", "prompt_token_ids": [1]})
        assert reply["type"] == "error" and reply["code"] == "overloaded" and reply["id"] == "c", reply
        assert "max_clients" in reply["message"] and "--max-clients" in reply["message"], reply
        assert pong(socks[0], "a again")  # the clients already in are still served
        socks[0].close(linger=0)
        wait_until(lambda: pong(socks[2], "c"), timeout=120)  # a place is free again
    finally:
        for s in socks:
            s.close(linger=0)
        assert srv.stop() == 0, srv.log()[-3000:]


def test_defaults_match_the_options():
    from gllm.cli import build_parser

    args = build_parser().parse_args(["serve"])
    defaults = ServerLimits()
    for name in LIMIT_FLAGS:
        dest = {"max_message_bytes": "max_message_size", "max_state_bytes": "max_state_size"}.get(name, name)
        assert getattr(args, dest) == getattr(defaults, name), name
