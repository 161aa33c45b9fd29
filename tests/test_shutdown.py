"""``gllm serve`` shutting down: every request in flight ends for its client, and the exit is clean.

On SIGTERM the runtime lets open requests run for ``--shutdown-grace`` seconds, ends the rest with
``shutting_down``, then gives clients ``--shutdown-drain`` seconds to read what still waits for them. The
slow reader here is made deterministic rather than left to the machine's speed: its socket takes almost
nothing, and SIGTERM is sent only once the runtime reports replies queued for it.
"""

from __future__ import annotations

import signal

import pytest
import zmq

from gllm.runtime.protocol import encode
from runtime_fixtures import (
    REPLY_TIMEOUT_S,
    build_tiny_llama,
    dealer,
    read_stream,
    slow_reader,
    start_server,
    stats,
    wait_until,
)

STREAM = 3000  # tokens asked for: far more than the sockets between runtime and client can hold


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-shutdown"))


def start_backed_up_stream(srv) -> zmq.Socket:
    """A slow reader with a long stream open, once the runtime holds replies that wait for it (if that fails,
    the runtime is killed: no test leaves one behind)."""
    reader = slow_reader(srv.endpoint)
    reader.send(encode({"type": "generate", "id": "long", "prompt_token_ids": [1, 2], "max_tokens": STREAM,
                        "ignore_eos": True, "logprobs": 5}))
    watcher = dealer(srv.endpoint)
    try:
        # How soon depends on the machine's speed: the stream fills the sockets between runtime and client
        # within its first thousand tokens or so; a busy machine may take minutes for that.
        wait_until(lambda: stats(watcher)["queued_replies"] > 0, timeout=10 * REPLY_TIMEOUT_S)
    except BaseException:
        reader.close(linger=0)
        srv.proc.kill()
        raise
    finally:
        watcher.close(linger=0)
    return reader


def test_slow_reader_gets_its_whole_stream_and_its_end_after_sigterm(tiny_dir, tmp_path):
    srv = start_server(tiny_dir, tmp_path, "--shutdown-grace", "1", "--shutdown-drain", "300",
                       "--max-seq-len", "4096", endpoint=f"ipc://{tmp_path}/gllm.sock")
    reader = start_backed_up_stream(srv)
    try:
        srv.proc.send_signal(signal.SIGTERM)
        # Read nothing until the grace period is over (a runtime that drops waiting replies has exited by then).
        wait_until(lambda: "grace period over" in srv.log() or srv.proc.poll() is not None, timeout=REPLY_TIMEOUT_S)
        tokens, end = read_stream(reader)
        assert [t["index"] for t in tokens] == list(range(len(tokens))), "tokens lost or out of order"
        assert all(t["id"] == "long" and len(t["top"]) == 5 for t in tokens)
        assert end["id"] == "long"
        if end["type"] == "done":  # the stream finished within the grace period
            assert end["finish_reason"] == "length" and len(tokens) == STREAM
        else:
            assert end["type"] == "error" and end["code"] == "shutting_down", end
            assert 0 < len(tokens) < STREAM
        assert srv.stop() == 0, srv.log()[-3000:]
        assert "shutting down: 1 request(s) in flight" in srv.log()
    finally:
        reader.close(linger=0)
        srv.stop()


def test_a_client_that_reads_nothing_cannot_hold_the_runtime(tiny_dir, tmp_path):
    srv = start_server(tiny_dir, tmp_path, "--shutdown-grace", "0.5", "--shutdown-drain", "1",
                       "--max-seq-len", "4096", endpoint=f"ipc://{tmp_path}/gllm.sock")
    reader = start_backed_up_stream(srv)
    try:
        assert srv.stop() == 0, srv.log()[-3000:]  # stop() fails the test if the process does not exit
        assert "grace period over; replies wait for 1 client(s)" in srv.log()
    finally:
        reader.close(linger=0)


def test_a_clean_exit_prints_nothing_alarming(tiny_dir, tmp_path):
    """No traceback, and nothing of libraries the CPU path does not use (Triton's nanobind leak report)."""
    srv = start_server(tiny_dir, tmp_path)
    assert srv.stop() == 0
    log = srv.log()
    assert "stopped" in log
    for alarming in ("Traceback", "nanobind", "leaked", "ERROR", "WARNING"):
        assert alarming not in log, log[-3000:]
