"""``gllm serve`` end to end: a real server process, raw DEALER sockets speaking protocol v1.

Most tests share one server on a tiny random Llama (no tokenizer, so prompts are token ids) and compare
what comes over the wire with the same engine run in this process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch
import zmq

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from gllm.runtime.protocol import ERROR_CODES, PROTOCOL_VERSION, encode
from runtime_fixtures import (
    build_tiny_llama,
    dealer,
    idle,
    read_stream,
    recv,
    request,
    start_server,
    stats,
    wait_until,
)

MAX_OPEN = 8
LONG = 2000  # tokens: a stream that takes many seconds, so a cancel always lands mid-stream


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-runtime"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    # float32 on both sides: bfloat16 logprobs move with the shape of the batch, and the server batches
    # the requests as they arrive while the in-process reference takes them all at once.
    srv = start_server(tiny_dir, tmp_path_factory.mktemp("serve-log"), "--max-open-requests", str(MAX_OPEN),
                       "--dtype", "float32")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine(tiny_dir, GeneratorParams(max_batch_size=8, max_seq_len=2048), dtype=torch.float32)


@pytest.fixture
def sock(server):
    s = dealer(server.endpoint)
    yield s
    s.close(linger=0)


def prompt(i: int, length: int = 6) -> list[int]:
    return [(31 * i + 7 * j + 1) % 256 for j in range(length)]


def test_info_and_ping(server, sock):
    info = request(sock, {"type": "info", "id": "i1"})
    assert info["type"] == "info" and info["id"] == "i1"
    assert info["protocol_version"] == PROTOCOL_VERSION
    assert info["vocab_size"] == 256 and info["max_seq_len"] == 2048 and info["model"]
    for key in ("kv_blocks_total", "kv_blocks_in_use", "running", "waiting", "cached_prompt_tokens"):
        assert isinstance(info["stats"][key], int)
    assert info["limits"]["max_open_requests"] == MAX_OPEN
    assert info["stats"]["gc_frozen_objects"] > 10_000  # start-up objects (torch, the model) kept out of GC
    assert request(sock, {"type": "ping", "id": 7}) == {"type": "pong", "id": 7}
    assert request(sock, {"type": "ping"}) == {"type": "pong", "id": None}


def test_greedy_streams_equal_engine_output(server, sock, engine):
    reqs = [dict(prompt_token_ids=prompt(i, 3 + 5 * i), max_tokens=12 + 4 * i) for i in range(4)]
    expected = engine.generate([GenerationRequest(prompt_token_ids=r["prompt_token_ids"], temperature=0.0,
                                                  max_new_tokens=r["max_tokens"], logprobs=3) for r in reqs])
    for i, r in enumerate(reqs):  # all four open at once, batched together on the server
        sock.send(encode({"type": "generate", "id": i, "temperature": 0, "logprobs": 3, **r}))
    tokens: dict[int, list[dict]] = {i: [] for i in range(4)}
    done: dict[int, dict] = {}
    while len(done) < 4:
        msg = recv(sock)
        if msg["type"] == "token":
            tokens[msg["id"]].append(msg)
        else:
            assert msg["type"] == "done", msg
            done[msg["id"]] = msg
    for i, exp in enumerate(expected):
        got = tokens[i]
        assert [m["index"] for m in got] == list(range(len(exp.token_ids)))  # in order, none missing
        assert [m["token_id"] for m in got] == exp.token_ids
        assert [m["logprob"] for m in got] == pytest.approx(exp.logprobs, abs=1e-4)
        assert [m["rank"] for m in got] == exp.ranks
        assert [[t[0] for t in m["top"]] for m in got] == [[t for t, _ in top] for top in exp.top_logprobs]
        assert done[i]["finish_reason"] == "length"
        assert done[i]["usage"] == {"prompt_tokens": len(reqs[i]["prompt_token_ids"]),
                                    "completion_tokens": reqs[i]["max_tokens"], "cached_tokens": 0}
        assert set(done[i]["timing"]) == {"queued_ms", "ttft_ms", "total_ms"}


def test_32_clients_each_get_only_their_own_stream(server, engine):
    n = 32
    expected = engine.generate([GenerationRequest(prompt_token_ids=prompt(i), max_new_tokens=8, temperature=0.0)
                                for i in range(n)])
    socks = [dealer(server.endpoint) for _ in range(n)]
    try:
        for i, s in enumerate(socks):  # the same client id everywhere: routing must go by connection
            s.send(encode({"type": "generate", "id": "npc", "prompt_token_ids": prompt(i), "max_tokens": 8,
                           "temperature": 0}))
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        got: list[list[int]] = [[] for _ in range(n)]
        finished: dict[int, dict] = {}
        deadline = time.monotonic() + 120
        while len(finished) < n:
            assert time.monotonic() < deadline, f"{n - len(finished)} streams did not finish"
            for s, _ in poller.poll(1000):
                i = socks.index(s)
                msg = recv(s)
                assert msg["id"] == "npc" and i not in finished
                if msg["type"] == "token":
                    assert msg["index"] == len(got[i])
                    got[i].append(msg["token_id"])
                else:
                    finished[i] = msg
        for i in range(n):
            assert got[i] == expected[i].token_ids, f"client {i} got someone else's tokens"
            assert finished[i]["type"] == "done" and finished[i]["finish_reason"] == "length"
    finally:
        for s in socks:
            s.close(linger=0)


def test_cancel_mid_stream_ends_with_cancelled_and_frees_blocks(server, sock):
    sock.send(encode({"type": "generate", "id": "long", "prompt_token_ids": prompt(1, 40), "max_tokens": LONG,
                      "ignore_eos": True, "temperature": 0.8, "seed": 1}))
    for _ in range(3):
        assert recv(sock)["type"] == "token"
    sock.send(encode({"type": "cancel", "id": "long"}))
    tokens, done = read_stream(sock)
    assert done["type"] == "done" and done["id"] == "long" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < LONG
    assert idle(sock)
    # Cancel is idempotent: a finished or unknown id gets no reply at all, not an error.
    sock.send(encode({"type": "cancel", "id": "long"}))
    sock.send(encode({"type": "cancel", "id": 12345}))
    assert request(sock, {"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}


KILLED_CLIENT = textwrap.dedent("""
    import sys, zmq
    from gllm.runtime.protocol import decode, encode
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(sys.argv[1])
    for i in range(2):
        sock.send(encode({"type": "generate", "id": i, "prompt_token_ids": [5, 6, 7, i], "max_tokens": %d,
                          "ignore_eos": True}))
    started = set()
    while len(started) < 2:
        started.add(decode(sock.recv())["id"])
    print("streaming", flush=True)
    while True:
        sock.recv()
""" % LONG)


# A vanished client is noticed by libzmq's disconnect event at once; the ZMTP heartbeat would notice it only
# after 60 s (twice the slow-client timeout). The deadline below lies between the two, generous for a slow machine.
DISCONNECT_NOTICED_S = 30.0


def test_killed_client_has_its_requests_cancelled_at_once(server, sock):
    before = stats(sock)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert stats(sock)["kv_blocks_in_use"] > 0
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: idle(sock), timeout=DISCONNECT_NOTICED_S)
    after = stats(sock)
    assert after["disconnects"] >= before["disconnects"] + 1  # an earlier test's closed socket may count late
    assert after["generated_tokens"] - before["generated_tokens"] < 2 * LONG  # cancelled, not finished


def test_closed_socket_has_its_requests_cancelled(server, sock):
    s = dealer(server.endpoint)
    s.send(encode({"type": "generate", "id": 1, "prompt_token_ids": prompt(3), "max_tokens": LONG,
                   "ignore_eos": True}))
    assert recv(s)["type"] == "token"
    s.close(linger=0)
    wait_until(lambda: idle(sock), timeout=DISCONNECT_NOTICED_S)


def test_refusals_get_error_replies(server, sock):
    def error_for(message):
        reply = request(sock, message)
        assert reply["type"] == "error" and reply["code"] in ERROR_CODES and reply["message"], reply
        return reply

    too_long = error_for({"type": "generate", "id": "a", "prompt_token_ids": [1] * 2048})
    assert too_long["code"] == "too_long" and too_long["id"] == "a"
    assert error_for({"type": "generate", "id": "b", "prompt_token_ids": [300]})["code"] == "bad_request"
    typo = error_for({"type": "generate", "id": "c", "prompt_token_ids": [1], "max_token": 5})
    assert typo["code"] == "bad_request" and "max_token" in typo["message"]
    assert error_for({"type": "generat", "id": "d"})["code"] == "unknown_type"
    assert error_for({"type": "score", "id": "e", "prompt_token_ids": [1], "candidates": [[999]]})["code"] == "bad_request"


def test_duplicate_ids_and_open_request_limit(server, sock):
    for i in range(MAX_OPEN):
        sock.send(encode({"type": "generate", "id": i, "prompt_token_ids": prompt(i), "max_tokens": LONG,
                          "ignore_eos": True}))
    dup = request(sock, {"type": "generate", "id": 0, "prompt_token_ids": [1]})
    while dup["type"] == "token":
        dup = recv(sock)
    assert dup["type"] == "error" and dup["code"] == "bad_request" and dup["id"] == 0
    sock.send(encode({"type": "generate", "id": "one-too-many", "prompt_token_ids": [1]}))
    ended: dict = {}
    overloaded = None
    for i in range(MAX_OPEN):
        sock.send(encode({"type": "cancel", "id": i}))
    while len(ended) < MAX_OPEN:
        msg = recv(sock)
        if msg["type"] == "error":
            overloaded = msg
        elif msg["type"] == "done":
            ended[msg["id"]] = msg["finish_reason"]
    assert overloaded is not None and overloaded["code"] == "overloaded" and overloaded["id"] == "one-too-many"
    assert set(ended.values()) == {"cancelled"}
    wait_until(lambda: idle(sock), timeout=10.0)


def test_score_equals_engine(server, sock, engine):
    candidates = [[5], [9, 10, 11], [200, 3]]
    expected = engine.score(ScoreRequest(prompt_token_ids=prompt(2, 9), candidates=candidates))
    reply = request(sock, {"type": "score", "id": "s", "prompt_token_ids": prompt(2, 9), "candidates": candidates})
    assert reply["type"] == "scores" and reply["id"] == "s"
    assert [c["token_ids"] for c in reply["candidates"]] == candidates
    for got, exp in zip(reply["candidates"], expected.candidates):
        assert got["logprob"] == pytest.approx(exp.logprob, abs=1e-4)
        assert got["token_logprobs"] == pytest.approx(exp.token_logprobs, abs=1e-4)


PEER_SCRIPT = textwrap.dedent("""
    import sys, zmq
    sys.stdin.readline()  # "go"
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(sys.argv[1])
    sock.send(b"hello")
    sys.stdin.readline()  # "close"
    sock.close(linger=0)
""")


def test_connection_tracker_tells_reused_descriptors_apart():
    """The OS hands a closed connection's descriptor number to the next one; only the closed peer is gone.

    The peers are separate processes started up front, so that nothing in this process takes the freed
    descriptor before the second connection is accepted."""
    from gllm.runtime.connections import ConnectionTracker
    from runtime_fixtures import free_port

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router.bind(endpoint)
    tracker = ConnectionTracker(router, ctx)
    peers = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, endpoint], stdin=subprocess.PIPE, text=True)
             for _ in range(2)]

    def tell(proc: subprocess.Popen, line: str) -> None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    def accept(proc: subprocess.Popen) -> tuple[bytes, int]:
        tell(proc, "go")
        assert router.poll(30_000)
        frames = router.recv_multipart(copy=False)
        tracker.seen(frames[0].bytes, frames[-1])
        return frames[0].bytes, frames[-1].get(zmq.SRCFD)

    try:
        first_peer, first_fd = accept(peers[0])
        tell(peers[0], "close")
        assert wait_until(tracker.gone, timeout=10) == [first_peer]
        second_peer, second_fd = accept(peers[1])
        assert second_fd == first_fd  # the case this guards against
        time.sleep(0.2)
        assert tracker.gone() == []
        tell(peers[1], "close")
        assert wait_until(tracker.gone, timeout=10) == [second_peer]
    finally:
        for proc in peers:
            proc.kill()
            proc.wait()
        tracker.close()
        ctx.destroy(linger=0)
