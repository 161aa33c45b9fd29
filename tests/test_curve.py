"""Access control: ``gllm keygen``, a runtime serving with CurveZMQ on a non-loopback bind (only allowed
client keys get anything), and the refusal to open a non-loopback address without it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from gllm.cli import main
from gllm.client import Client
from gllm.runtime.access import is_local
from gllm.runtime.keys import ClientKeys, read_allowed_keys, read_key
from gllm.runtime.protocol import encode
from runtime_fixtures import build_tiny_llama, dealer, free_port, read_stream, start_server

SILENCE_S = 3.0  # how long a refused client waits to be sure nothing comes


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("server", "client", "stranger"):
        assert main(["keygen", name, "--out", str(folder)]) == 0
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "client.pub").write_bytes((folder / "client.pub").read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(keys, tmp_path_factory):
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-curve"))
    bind = f"tcp://0.0.0.0:{free_port()}"  # every interface: allowed because CurveZMQ is on
    client_keys = ClientKeys.load(keys / "server.pub", keys / "client.key")
    srv = start_server(model, tmp_path_factory.mktemp("curve-log"), "--curve-secret-key", str(keys / "server.key"),
                       "--allowed-keys", str(keys / "allowed"), endpoint=bind, keys=client_keys)
    srv.endpoint = bind.replace("0.0.0.0", "127.0.0.1")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_keygen_writes_a_usable_key_pair(keys, capsys):
    secret_mode = stat.S_IMODE(os.stat(keys / "server.key").st_mode)
    assert secret_mode == 0o600
    public, secret = read_key(keys / "server.pub"), read_key(keys / "server.key")
    assert len(public) == len(secret) == 40 and public != secret
    assert zmq.curve_public(secret) == public
    assert read_allowed_keys(keys / "allowed") == {read_key(keys / "client.pub")}
    capsys.readouterr()
    assert main(["keygen", "server", "--out", str(keys)]) != 0  # an existing key is never overwritten silently
    assert "--force" in capsys.readouterr().err


def test_allowed_client_streams(server, keys):
    with Client(server.endpoint, server_key=keys / "server.pub", secret_key=keys / "client.key", timeout=60) as c:
        result = c.complete(prompt_token_ids=[1, 2, 3], max_tokens=5, temperature=0, ignore_eos=True)
        assert len(result.tokens) == 5 and result.finish_reason == "length"
    server_key = read_key(keys / "server.pub").decode()  # keys may also be given as Z85 text
    with Client(server.endpoint, server_key=server_key, secret_key=keys / "client.key") as c:
        assert c.ping() > 0


def test_unknown_key_gets_nothing(server, keys):
    with Client(server.endpoint, server_key=keys / "server.pub", secret_key=keys / "stranger.key") as c:
        with pytest.raises(TimeoutError):
            c.ping(timeout=SILENCE_S)


def test_plain_connection_gets_nothing(server, keys):
    sock = dealer(server.endpoint)
    try:
        sock.send(encode({"type": "generate", "id": 1, "prompt_token_ids": [1], "max_tokens": 2}))
        assert not sock.poll(int(SILENCE_S * 1000))
    finally:
        sock.close(linger=0)
    # The refused connections did not disturb anyone: the allowed client is still served.
    allowed = dealer(server.endpoint, ClientKeys.load(keys / "server.pub", keys / "client.key"))
    try:
        allowed.send(encode({"type": "generate", "id": 2, "prompt_token_ids": [1], "max_tokens": 2}))
        tokens, done = read_stream(allowed)
        assert len(tokens) == 2 and done["type"] == "done"
    finally:
        allowed.close(linger=0)


def test_open_bind_without_keys_is_refused(keys, tmp_path, capsys):
    bind = f"tcp://0.0.0.0:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "gllm", "serve", "--model", str(tmp_path / "never-loaded"),
                           "--bind", bind], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "refusing to serve" in done.stderr and "--insecure" in done.stderr and "gllm keygen" in done.stderr
    assert main(["serve", "--bind", bind, "--curve-secret-key", str(keys / "server.key")]) != 0
    assert "--allowed-keys" in capsys.readouterr().err


def test_which_endpoints_are_local():
    for endpoint in ["tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "tcp://127.8.0.1:9",
                     "ipc:///tmp/gllm.sock", "inproc://x"]:
        assert is_local(endpoint), endpoint
    for endpoint in ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.4:5555", "tcp://[::]:5555",
                     "tcp://eth0:5555", "tcp://example.com:5555", "ws://127.0.0.1:5555"]:
        assert not is_local(endpoint), endpoint
