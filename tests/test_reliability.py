"""Reliability: slow readers lose nothing (within bounds), faults stay with their batch, clients time out and
reconnect, and a model that cannot load stops ``gllm serve`` with one clear line.

Most tests run the server in a thread of this process, so that they can reach into the engine (inject a
fault, read its block count); the restart test runs real ``gllm serve`` processes, killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from gllm.client import AsyncClient, Client, RuntimeTimeout
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import decode, encode
from gllm.runtime.server import Server
from runtime_fixtures import (
    REPLY_TIMEOUT_S,
    build_tiny_llama,
    dealer,
    free_port,
    read_stream,
    recv,
    slow_reader,
    start_server,
    stats,
    wait_until,
)

POISON = [66, 6, 66, 6]  # a prompt that the injected fault recognises


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-reliability"))


@contextlib.contextmanager
def serving(model, limits: ServerLimits = ServerLimits(),
            params: GeneratorParams | None = None) -> Iterator[tuple[Server, LLMEngine]]:
    """A ``Server`` on a free port, its loop in a thread; stopped (without grace) on exit."""
    engine = LLMEngine(model, params or GeneratorParams(max_batch_size=8, max_seq_len=2048))
    server = Server(engine, "tcp://127.0.0.1:*", limits)
    thread = threading.Thread(target=server.run, name="gllm-server", daemon=True)
    thread.start()
    try:
        yield server, engine
    finally:
        server.stop()
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "the server loop did not stop"


def long_stream(request_id: str, max_tokens: int, prompt: list[int] | None = None) -> bytes:
    """A fixed-length stream with the largest token messages (20 alternatives each)."""
    return encode({"type": "generate", "id": request_id, "prompt_token_ids": prompt or [1, 2, 3],
                   "max_tokens": max_tokens, "ignore_eos": True, "logprobs": 20})


def fail_once_on(monkeypatch, engine: LLMEngine, prompt: list[int]) -> list[int]:
    """Make the model raise once, in the batch that computes ``prompt``'s first chunk. Returns the list that
    records each injected fault."""
    execute = engine.runner.execute
    fired: list[int] = []

    def faulty(chunks, copies, input_ids=None):
        if not fired and any(c.start == 0 and c.token_ids[: len(prompt)] == prompt for c in chunks):
            fired.append(len(chunks))
            raise RuntimeError("injected fault")
        return execute(chunks, copies, input_ids)

    monkeypatch.setattr(engine.runner, "execute", faulty)
    return fired


# ------------------------------------------------------------------------------------------ slow clients
def test_a_client_that_stops_reading_for_10s_gets_every_token(tiny_dir):
    # The client reads nothing while the stream is computed and 10 s more: the slow-client bound is set far
    # beyond that, whatever the machine's speed.
    with serving(tiny_dir, ServerLimits(slow_client_timeout_s=600)) as (server, engine):
        slow, watcher = slow_reader(server.endpoint), dealer(server.endpoint)
        try:
            slow.send(long_stream("s", 500))
            sent = time.monotonic()
            # The engine does not wait: the whole stream is computed while the client reads nothing, and
            # what its socket cannot take waits in the runtime's outbox for it.
            wait_until(lambda: stats(watcher)["finished_requests"] == 1, timeout=60)
            assert stats(watcher)["queued_replies"] > 0
            time.sleep(max(0.0, 10 - (time.monotonic() - sent)))
            tokens, end = read_stream(slow)
            assert [t["index"] for t in tokens] == list(range(500))
            assert all(t["id"] == "s" and len(t["top"]) == 20 for t in tokens)
            assert end["type"] == "done" and end["finish_reason"] == "length"
            assert end["usage"]["completion_tokens"] == 500
            wait_until(lambda: stats(watcher)["queued_replies"] == 0, timeout=10)
            assert stats(watcher)["slow_clients"] == 0
        finally:
            slow.close(linger=0)
            watcher.close(linger=0)


@pytest.mark.parametrize("bound", ["bytes", "time"])
def test_a_client_past_its_bound_is_cut_off_while_others_stream_on(tiny_dir, bound):
    limits = ServerLimits(max_outbox_bytes=32 << 10) if bound == "bytes" else ServerLimits(slow_client_timeout_s=1.0)
    with serving(tiny_dir, limits) as (server, engine):
        slow, fast = slow_reader(server.endpoint), dealer(server.endpoint)
        try:
            slow.send(long_stream("s", 2000))
            fast.send(long_stream("f", 300, prompt=[4, 5, 6]))
            tokens, end = read_stream(fast)
            assert [t["index"] for t in tokens] == list(range(300)) and end["type"] == "done"
            deadline = time.monotonic() + 30
            while stats(fast)["slow_clients"] == 0:  # the slow client still talks (it answers no PING, but
                assert time.monotonic() < deadline  # its messages show it is alive): only its bound cuts it off
                slow.send(encode({"type": "ping", "id": "alive"}))
                time.sleep(0.2)
            got = []
            while (msg := recv(slow, timeout=10))["type"] in ("token", "pong"):
                if msg["type"] == "token":
                    got.append(msg["index"])
            assert got == list(range(len(got))) and len(got) < 2000  # in order; the backlog was dropped
            assert msg["type"] == "error" and msg["code"] == "slow_client" and msg["id"] == "s", msg
            assert ("--max-outbox-size" if bound == "bytes" else "--slow-client-timeout") in msg["message"]
            while slow.poll(300):  # then nothing but the answers to its last pings
                assert decode(slow.recv())["type"] == "pong"
            wait_until(lambda: stats(fast)["kv_blocks_in_use"] == 0 and stats(fast)["queued_replies"] == 0, 10)
            s = stats(fast)
            assert s["running"] == 0 and s["waiting"] == 0 and s["open_requests"] == 0
        finally:
            slow.close(linger=0)
            fast.close(linger=0)
    assert engine.stats()["kv_blocks_in_use"] == 0


# ------------------------------------------------------------------------------------------------ faults
def test_engine_fault_ends_only_the_failed_batch(tiny_dir, monkeypatch):
    engine = LLMEngine(tiny_dir, GeneratorParams(max_batch_size=1, max_seq_len=256))
    fired = fail_once_on(monkeypatch, engine, POISON)
    reference = LLMEngine(tiny_dir, GeneratorParams(max_batch_size=1, max_seq_len=256))
    good = GenerationRequest(prompt_token_ids=[9, 8, 7], max_new_tokens=12, temperature=0.0)
    (expected,) = reference.generate([good])
    bad_result, good_result = engine.generate([
        GenerationRequest(prompt_token_ids=POISON, max_new_tokens=12, temperature=0.0), good])
    assert fired == [1]
    assert bad_result.finish_reason == "error" and "injected fault" in bad_result.error
    assert good_result.finish_reason == "length" and good_result.token_ids == expected.token_ids
    assert engine.stats()["kv_blocks_in_use"] == 0 and engine.stats()["failed_batches"] == 1


def test_a_step_fault_fails_its_requests_with_internal_and_the_runtime_goes_on(tiny_dir, monkeypatch):
    with serving(tiny_dir, params=GeneratorParams(max_batch_size=1, max_seq_len=2048)) as (server, engine):
        fired = fail_once_on(monkeypatch, engine, POISON)
        sock = dealer(server.endpoint)
        try:
            sock.send(encode({"type": "generate", "id": "bad", "prompt_token_ids": POISON, "max_tokens": 20}))
            sock.send(encode({"type": "generate", "id": "good", "prompt_token_ids": [9, 8, 7], "max_tokens": 20}))
            ends, tokens = {}, {"bad": [], "good": []}
            while len(ends) < 2:
                msg = recv(sock)
                if msg["type"] == "token":
                    tokens[msg["id"]].append(msg["index"])
                else:
                    ends[msg["id"]] = msg
            assert fired == [1]
            assert ends["bad"]["type"] == "error" and ends["bad"]["code"] == "internal"
            assert "injected fault" in ends["bad"]["message"] and tokens["bad"] == []
            assert ends["good"]["type"] == "done" and ends["good"]["finish_reason"] == "length"
            assert tokens["good"] == list(range(20))
            sock.send(encode({"type": "generate", "id": "next", "prompt_token_ids": POISON, "max_tokens": 5}))
            tokens, end = read_stream(sock)
            assert len(tokens) == 5 and end["type"] == "done"
            s = stats(sock)
            assert s["kv_blocks_in_use"] == 0 and s["failed_batches"] == 1 and s["open_requests"] == 0
        finally:
            sock.close(linger=0)


def test_kv_exhaustion_preempts_or_refuses_never_crashes(tiny_dir):
    params = GeneratorParams(max_batch_size=8, max_seq_len=2048, num_kv_blocks=8)  # 128 tokens of cache
    with serving(tiny_dir, params=params) as (server, engine):
        socks = [dealer(server.endpoint) for _ in range(4)]
        try:
            for i, s in enumerate(socks):  # 4 x 90 tokens: they cannot all hold their blocks at once
                s.send(encode({"type": "generate", "id": i, "prompt_token_ids": [i + 1] * 10, "max_tokens": 80,
                               "ignore_eos": True}))
            for s in socks:
                tokens, end = read_stream(s)
                assert len(tokens) == 80 and end["type"] == "done" and end["finish_reason"] == "length"
            socks[0].send(encode({"type": "generate", "id": "huge", "prompt_token_ids": [1] * 10,
                                  "max_tokens": 500}))
            refused = recv(socks[0])
            assert refused["type"] == "error" and refused["code"] == "too_long" and refused["id"] == "huge"
            s = stats(socks[0])
            assert s["preemptions"] > 0 and s["kv_blocks_in_use"] == 0
        finally:
            for s in socks:
                s.close(linger=0)


# ----------------------------------------------------------------------------------------- model loading
def test_serve_with_a_missing_model_exits_with_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "gllm", "serve", "--model", "/nonexistent.gguf"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and "/nonexistent.gguf" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_serve_reports_any_load_failure_in_one_line(monkeypatch, capsys):
    import gllm.engine
    from gllm.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gllm.engine, "LLMEngine", broken)
    assert main(["serve", "--model", "some-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "some-model" in err and "CUDA out of memory" in err


# -------------------------------------------------------------------------------- client timeouts, restarts
def test_clients_time_out_when_the_runtime_dies_and_work_again_after_a_restart(tiny_dir, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    request = dict(prompt_token_ids=[3, 1, 4, 1, 5], max_tokens=6, temperature=0)

    async def main() -> None:
        first = start_server(tiny_dir, tmp_path / "first", endpoint=endpoint)
        # Generous waits while a runtime is up (a busy machine may be slow); short ones while it is down.
        sync = Client(endpoint, timeout=REPLY_TIMEOUT_S)
        aio = AsyncClient(endpoint, timeout=REPLY_TIMEOUT_S)
        down = 1.5
        try:
            expected = sync.complete(**request).token_ids
            assert (await aio.complete(**request)).token_ids == expected
            stream = sync.generate(prompt_token_ids=[2, 7], max_tokens=2000, ignore_eos=True, timeout=down)
            next(stream)
            first.proc.kill()
            first.proc.wait()
            with pytest.raises(RuntimeTimeout):
                for _ in stream:
                    pass
            with pytest.raises(RuntimeTimeout):
                sync.ping(timeout=down)
            with pytest.raises(RuntimeTimeout):
                await aio.ping(timeout=down)
            with pytest.raises(TimeoutError):  # RuntimeTimeout is a TimeoutError
                await aio.complete(**request, timeout=down)
            second = start_server(tiny_dir, tmp_path / "second", endpoint=endpoint)
            try:
                assert sync.complete(**request).token_ids == expected
                assert (await aio.complete(**request)).token_ids == expected
                stream = sync.generate(**request)
                assert [t.index for t in stream] == list(range(6)) and stream.result.finish_reason == "length"
            finally:
                assert second.stop() == 0, second.log()[-3000:]
        finally:
            sync.close()
            aio.close()
            if first.proc.poll() is None:
                first.proc.kill()

    asyncio.run(main())
