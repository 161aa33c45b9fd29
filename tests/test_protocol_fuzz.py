"""Protocol v1 against bad input: the validator on its own (hypothesis), a real server fed over 200
malformed messages while another client streams, the protocol fuzzer (``protocol_fuzzer.py``: structured
and raw messages from several connections, every reply checked), plus the test vectors in
``bindings/testvectors``."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gllm.runtime import protocol
from gllm.runtime.protocol import ERROR_CODES, ProtocolError, decode, encode, parse_request
from protocol_fuzzer import Fuzzer, reply_problem
from runtime_fixtures import build_tiny_llama, dealer, read_stream, recv, request, start_server, stats, wait_until

VECTORS = Path(__file__).resolve().parents[1] / "bindings" / "testvectors"
MAX_MESSAGE = 64 * 1024
FUZZ_MESSAGES = 4000  # about 10 s here; benchmarks/fuzz.py runs 100,000


# ------------------------------------------------------------------------------------ the validator alone
def _parses_or_refuses(frame: bytes) -> None:
    try:
        req = parse_request(frame)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES and exc.message
        assert exc.request_id is None or isinstance(exc.request_id, (str, int))
    else:
        assert type(req).__name__.lower() in protocol.SCHEMAS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_protocol_errors(frame):
    _parses_or_refuses(frame)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
field_names = st.sampled_from(["type", "id", "prompt", "messages", "prompt_token_ids", "max_tokens", "temperature",
                               "top_k", "top_p", "seed", "stop", "logprobs", "priority", "ignore_eos",
                               "candidates", "max_token"])
message_types = st.sampled_from([*protocol.SCHEMAS, "token", "Generate"])


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_any_msgpack_value_is_parsed_or_refused(value):
    _parses_or_refuses(encode(value))


@settings(max_examples=400, deadline=None)
@given(message_types, st.dictionaries(field_names, msgpack_values, max_size=6))
def test_maps_with_known_field_names_are_parsed_or_refused(kind, fields):
    _parses_or_refuses(encode({**fields, "type": kind}))


def test_nil_fields_count_as_absent_and_defaults_apply():
    req = parse_request(encode({"type": "generate", "id": 3, "prompt": "hi", "seed": None, "max_tokens": None}))
    assert isinstance(req, protocol.Generate) and req.seed is None and req.max_tokens == 64 and req.temperature == 1.0
    assert req.thinking is False


def test_thinking_is_a_boolean_of_generate_and_score():
    chat = [{"role": "user", "content": "hi"}]
    assert parse_request(encode({"type": "generate", "id": 1, "messages": chat, "thinking": True})).thinking is True
    score = parse_request(encode({"type": "score", "id": 2, "messages": chat, "candidates": ["a"], "thinking": True}))
    assert score.thinking is True
    for wrong in ("yes", 1, [True]):
        with pytest.raises(ProtocolError, match="thinking"):
            parse_request(encode({"type": "generate", "id": 3, "prompt": "hi", "thinking": wrong}))


def test_any_message_may_carry_an_affinity_key_which_is_checked():
    for kind in ("generate", "score", "cancel", "info", "ping"):
        msg = {"type": kind, "id": 1, "affinity": "npc-7", "prompt_token_ids": [1], "candidates": [[2]]}
        msg = {k: v for k, v in msg.items() if k in protocol.SCHEMAS[kind][1] or k in ("type", "affinity")}
        assert protocol.affinity_of(msg) == "npc-7"
        parse_request(encode(msg))
    for bad in (1.5, True, [], "x" * 300):
        with pytest.raises(ProtocolError, match="'affinity'") as caught:
            parse_request(encode({"type": "ping", "id": 4, "affinity": bad}))
        assert caught.value.code == "bad_request" and caught.value.request_id == 4
    parse_request(encode({"type": "ping", "affinity": None}))  # nil: absent


# -------------------------------------------------------------------------------------- test vectors
def _vector_generator():
    spec = importlib.util.spec_from_file_location("testvector_generator", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_testvectors_are_up_to_date_and_round_trip():
    generator = _vector_generator()
    files = generator.expected_files()
    assert len(files) >= 30
    for name, data in files.items():
        assert (VECTORS / name).read_bytes() == data, f"{name} is stale: run bindings/testvectors/generate.py"
    for packed in sorted(VECTORS.glob("*.msgpack")):
        as_json = generator.from_json(packed.with_suffix(".json").read_text())
        assert decode(packed.read_bytes()) == as_json
        assert encode(as_json) == packed.read_bytes()
        if packed.name.startswith("to_runtime_"):
            parse_request(packed.read_bytes())


# ---------------------------------------------------------------------------------- a server under fire
def _bad_generates() -> list[dict[str, Any]]:
    base = {"type": "generate", "id": "g", "prompt_token_ids": [1, 2]}
    bad_values = {
        "id": [[], {}, True, 1.5, "x" * 300, b"id"],
        "prompt": [1, [], b"hi", True],
        "messages": ["hi", [], [1], [{"role": "user"}], [{"role": 1, "content": "x"}],
                     [{"role": "user", "content": "x", "name": "bob"}], {"role": "user", "content": "x"}],
        "prompt_token_ids": [[], [-1], [2**40], ["1"], [1.0], "1,2,3", [[1]], [True]],
        "max_tokens": [0, -1, 2**40, 1.5, "64", True, -(2**63), 2**64 - 1],
        "temperature": [-0.1, "1", math.inf, math.nan, True, 1e9, [], -math.inf],
        "top_k": [-1, 1.0, 2**40, "5"],
        "top_p": [0, 0.0, 1.5, -1, math.nan, "0.9", 1e308],
        "seed": [-1, -(2**63), 1.5, "42"],
        "stop": ["\n", [""], [1], ["x"] * 17, ["y" * 300], [None]],
        "logprobs": [-1, 21, 2**31, 1.5, True],
        "priority": [2**31, -(2**31) - 1, 0.5, "high"],
        "ignore_eos": [1, "true", 0.0],
        "context_overflow": ["keep", 1, True, "drop_oldest"],  # drop_oldest needs messages
        "max_tokens_per_second": [0, -1, "5", math.inf, math.nan],
        "deadline_ms": [-1, "300", math.nan, [300]],
        "deterministic": [1, "yes", 0.0],
    }
    out = []
    for name, values in bad_values.items():
        for v in values:
            msg = {k: v for k, v in base.items() if not (name in ("prompt", "messages") and k == "prompt_token_ids")}
            out.append({**msg, name: v})
    return out


def malformed_messages() -> list[tuple[list[bytes], str]]:
    """(frames, expected error code): over 200 messages that must each get an ``error`` reply."""
    rng = random.Random(0)
    cases: list[tuple[list[bytes], str]] = []
    for _ in range(60):
        cases.append(([rng.randbytes(rng.randint(1, 200))], "bad_request"))
    cases.append(([b""], "bad_request"))
    for value in [1, "generate", [], [{"type": "ping"}], True, 3.5, b"bin", -7, {}]:
        cases.append(([encode(value)], "bad_request"))
    for msg in [{"id": 1}, {"id": "x", "prompt": "hi"}, {"type": None}, {"type": 1}, {"type": ["generate"]},
                {"type": b"generate"}, {"type": True}, {"type": {"name": "ping"}}]:
        cases.append(([encode(msg)], "bad_request"))
    for kind in ["Generate", "gen", "", "generate ", "cancel_all", "shutdown", "x" * 1000, "token", "done", "error"]:
        cases.append(([encode({"type": kind, "id": 1})], "unknown_type"))
    cases += [([encode(m)], "bad_request") for m in _bad_generates()]
    for msg in [{"type": "generate", "id": 1}, {"type": "generate", "id": 2, "prompt": "a", "prompt_token_ids": [1]},
                {"type": "generate", "id": 3, "prompt": "a", "messages": [{"role": "user", "content": "b"}],
                 "prompt_token_ids": [1]},
                {"type": "generate", "prompt_token_ids": [1]}]:
        cases.append(([encode(msg)], "bad_request"))
    for extra in ["max_token", "temprature", "n", "stream", "model", "", "ID", "Type", 5, b"bin-key"]:
        cases.append(([encode({"type": "generate", "id": "x", "prompt_token_ids": [1], extra: 1})], "bad_request"))
    score = {"type": "score", "id": "s", "prompt_token_ids": [1]}
    for cands in [None, [], "abc", [""], [[]], [[-1]], [1], [[1, "a"]], ["a"] * 300, [{}], [[2**40]]]:
        cases.append(([encode({**score, "candidates": cands})], "bad_request"))
    cases.append(([encode({**score, "candidates": [[1]], "candidate": [[1]]})], "bad_request"))
    for msg in [{"type": "cancel"}, {"type": "cancel", "id": []}, {"type": "cancel", "id": {}},
                {"type": "cancel", "id": 1.5}, {"type": "cancel", "id": True}, {"type": "cancel", "id": 1, "all": True},
                {"type": "info", "verbose": True}, {"type": "ping", "id": []}, {"type": "ping", "payload": "x"},
                {"type": "info", "id": None, "x": 1}]:
        cases.append(([encode(msg)], "bad_request"))
    for msg in [{"type": "snapshot", "id": 1}, {"type": "snapshot", "id": 1, "prompt_token_ids": [1] * 5},
                {"type": "snapshot", "id": 1, "prompt": "a", "pin": True}, {"type": "restore", "id": 1},
                {"type": "restore", "id": 1, "state": "text"}, {"type": "restore", "id": 1, "state": b"x", "pin": 1},
                {"type": "restore", "id": 1, "state": b"not a state"}, {"type": "inject", "id": 1},
                {"type": "inject", "id": 1, "text": "a", "token_ids": [1]}, {"type": "inject", "id": 1, "token_ids": []},
                {"type": "inject", "text": "a"}, {"type": "release"}, {"type": "release", "id": 1, "all": True}]:
        cases.append(([encode(msg)], "bad_request"))
    nested: Any = "x"
    for _ in range(400):  # about as deep as msgpack-python will pack; the raw frames below go deeper
        nested = {"a": nested}
    cases += [([b"\x91" * 3000 + b"\x00"], "bad_request"), ([b"\x91" * 5000 + b"\xc0"], "bad_request"),
              ([encode({"type": "generate", "id": 1, "prompt": nested})], "bad_request"),
              ([encode({"type": "generate", "id": 1, "messages": [nested]})], "bad_request"),
              ([b"\x81" * 4000 + b"\xa1a\xc0"], "bad_request")]
    cases += [([b"\x82\xa4type\xa3\xff\xfe\xfd\xa2id\x01"], "bad_request"),  # invalid UTF-8 in a str
              ([encode({"type": "generate", "id": msgpack.ExtType(5, b"xx"), "prompt": "a"})], "bad_request"),
              ([encode({"type": "generate", "id": 1, "prompt": "a", "temperature": msgpack.Timestamp(1, 0)})],
               "bad_request")]
    valid = encode({"type": "generate", "id": 1, "prompt_token_ids": [1, 2, 3], "max_tokens": 4})
    cases += [([valid[: len(valid) // 2]], "bad_request"), ([valid + b"\x00"], "bad_request"),
              ([valid, valid], "bad_request"), ([b"", valid], "bad_request"), ([valid, b""], "bad_request")]
    cases += [([encode({"type": "generate", "id": "big", "prompt": "x" * (MAX_MESSAGE + 10)})], "too_long"),
              ([rng.randbytes(100_000)], "too_long")]
    return cases


def _echoed_id(frames: list[bytes]) -> Any:
    """The id an error reply must echo: the message's id when it has a valid one, else nil."""
    try:
        msg = decode(frames[0]) if len(frames) == 1 else None
    except ProtocolError:
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    ok = (isinstance(rid, int) and not isinstance(rid, bool)) or (isinstance(rid, str) and len(rid) <= 256)
    names_another = isinstance(msg, dict) and msg.get("type") in ("inject", "release")  # that request goes on
    return rid if ok and len(frames[0]) <= MAX_MESSAGE and not names_another else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-fuzz"))
    # A saved state may be larger than a message; at 2x here, the hard frame limit stays 4x the message size.
    srv = start_server(model, tmp_path_factory.mktemp("fuzz-log"), "--max-message-size", str(MAX_MESSAGE),
                       "--max-state-size", str(2 * MAX_MESSAGE))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_malformed_messages_get_errors_while_others_are_served(server):
    cases = malformed_messages()
    assert len(cases) >= 200
    good, bad = dealer(server.endpoint), dealer(server.endpoint)
    stream = {"type": "generate", "id": "steady", "prompt_token_ids": [9, 8, 7], "max_tokens": 120,
              "temperature": 0, "ignore_eos": True}
    try:
        good.send(encode(stream))
        for n, (frames, code) in enumerate(cases):
            bad.send_multipart(frames)
            reply = recv(bad)
            assert reply["type"] == "error", (n, frames[0][:60], reply)
            assert reply["code"] == code, (n, frames[0][:60], reply)
            assert reply["id"] == _echoed_id(frames), (n, frames[0][:60], reply)
            assert isinstance(reply["message"], str) and reply["message"]
        tokens, done = read_stream(good)
        assert done["type"] == "done" and done["finish_reason"] == "length"
        assert [t["index"] for t in tokens] == list(range(120))
        good.send(encode({**stream, "id": "again"}))
        again_tokens, _ = read_stream(good)
        assert [t["token_id"] for t in again_tokens] == [t["token_id"] for t in tokens]
        assert request(bad, {"type": "ping", "id": "still here"})["type"] == "pong"
    finally:
        good.close(linger=0)
        bad.close(linger=0)


def test_frame_over_the_hard_limit_drops_the_connection_not_the_server(server):
    probe, sock = dealer(server.endpoint), dealer(server.endpoint)
    try:
        before = stats(probe)["disconnects"]
        assert request(sock, {"type": "ping", "id": 1})["type"] == "pong"
        sock.send(b"\x00" * (4 * MAX_MESSAGE + 1))  # beyond MAXMSGSIZE: libzmq closes the connection
        # >=: a connection closed by an earlier test may be counted in the same window.
        wait_until(lambda: stats(probe)["disconnects"] >= before + 1, timeout=30)
        # The DEALER reconnects by itself and the runtime serves it as a new client.
        assert request(sock, {"type": "ping", "id": 2}) == {"type": "pong", "id": 2}
    finally:
        probe.close(linger=0)
        sock.close(linger=0)


def test_fuzzer_gets_a_valid_reply_to_everything_and_leaves_nothing_held(server):
    fuzzer = Fuzzer(server.endpoint, seed=7)
    try:
        report = fuzzer.run(FUZZ_MESSAGES)
        final = fuzzer.settle()  # raises unless no KV block and no request is left
    finally:
        fuzzer.close()
    assert server.proc.poll() is None, server.log()[-3000:]
    assert report.messages == FUZZ_MESSAGES and final["kv_blocks_in_use"] == 0
    for kind in ("token", "done", "scores", "pong", "info", "error:bad_request", "error:too_long"):
        assert report.replies[kind] > 0, (kind, report.replies)  # every path was taken
    assert report.cancels > 0 and report.disconnects > 0


def test_reply_checker_rejects_broken_replies():
    good = {"type": "done", "id": 1, "finish_reason": "stop", "text": "", "timing": {"ttft_ms": None},
            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 0}}
    assert reply_problem(good) is None
    for bad in [None, [], {"type": 1}, {**good, "finish_reason": "aborted"}, {**good, "usage": {}},
                {**good, "id": 1.5}, {"type": "token", "id": 1, "index": -1}, {"type": "error", "code": "nope"},
                {"type": "goodbye"}]:
        assert reply_problem(bad) is not None, bad
