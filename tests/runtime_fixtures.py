"""Helpers for tests that talk to a real ``gllm serve`` process over ZeroMQ.

``start_server`` runs ``python -m gllm serve`` on a free port and waits until it answers ``ping``; tests
stop it with SIGTERM. Raw DEALER helpers speak protocol v1 directly, so the runtime is tested without the
Python client in between. Every wait polls for a condition with a generous deadline: the machine running
the tests may be slow and busy, and no test should pass or fail on timing luck.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import zmq

from gllm.runtime.keys import ClientKeys
from gllm.runtime.protocol import decode, encode

READY_TIMEOUT_S = 300.0  # loading the default model on a busy 2-core machine takes a while
REPLY_TIMEOUT_S = 60.0


def build_tiny_llama(folder: Path, max_positions: int = 4096, vocab_size: int = 256) -> Path:
    """A random 2-layer Llama without tokenizer (so prompts are token ids); room for long streams."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.5, max_position_embeddings=max_positions,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    endpoint: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"gllm serve did not exit within {timeout} s of SIGTERM:\n{self.log()[-3000:]}")


def start_server(model: str | Path, log_dir: Path, *args: str, endpoint: str | None = None,
                 keys: ClientKeys | None = None) -> ServerProcess:
    """Start ``python -m gllm serve`` and wait until it answers a ping (sent with ``keys`` when given)."""
    endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
    log_path = log_dir / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gllm", "serve", "--model", str(model), "--bind", endpoint,
                                 *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, endpoint, log_path)
    sock = dealer(endpoint, keys)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gllm serve exited with {proc.returncode}:\n{server.log()[-3000:]}")
            if time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"gllm serve did not answer within {READY_TIMEOUT_S} s:\n{server.log()[-3000:]}")
            sock.send(encode({"type": "ping", "id": "ready?"}))
            if sock.poll(1000):
                assert decode(sock.recv())["type"] == "pong"
                return server
    finally:
        sock.close(linger=0)


def dealer(endpoint: str, keys: ClientKeys | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        keys.apply(sock)
    sock.connect(endpoint)
    return sock


def slow_reader(endpoint: str) -> zmq.Socket:
    """A DEALER that keeps almost nothing on its side (libzmq queue, socket buffer) while it does not read,
    so that the runtime has to hold its replies back."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(endpoint)
    return sock


def recv(sock: zmq.Socket, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"no reply within {timeout} s")
    return decode(sock.recv())


def request(sock: zmq.Socket, message: dict[str, Any], timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
    sock.send(encode(message))
    return recv(sock, timeout)


def read_stream(sock: zmq.Socket, timeout: float = REPLY_TIMEOUT_S) -> tuple[list[dict], dict]:
    """Token messages until the ``done`` (or ``error``) that ends a single open request."""
    tokens = []
    while True:
        msg = recv(sock, timeout)
        if msg["type"] != "token":
            return tokens, msg
        tokens.append(msg)


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def stats(sock: zmq.Socket) -> dict[str, Any]:
    """The runtime's statistics, asked on an open socket (a socket per call would add disconnects)."""
    return request(sock, {"type": "info", "id": "stats"})["stats"]


def idle(sock: zmq.Socket) -> bool:
    """No request open or running and no KV block held (prefix-cached blocks do not count)."""
    s = stats(sock)
    return s["kv_blocks_in_use"] == 0 and s["running"] == 0 and s["waiting"] == 0 and s["open_requests"] == 0


@contextmanager
def dealer_left_idle(endpoint: str, timeout: float) -> Iterator[zmq.Socket]:
    """A DEALER for one test, which must leave the runtime idle (nothing running, no KV block held)."""
    sock = dealer(endpoint)
    yield sock
    wait_until(lambda: idle(sock), timeout=timeout)
    sock.close(linger=0)
