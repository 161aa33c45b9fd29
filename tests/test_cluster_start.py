"""Starting ``gllm serve --replicas``: joining a cluster of ``ray start --head``; and asked to stop (SIGTERM)
while its replicas are still starting: it stops at once and exits with 0, ends the Ray instance it
started, and is not held by a Ray instance that vanished."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gllm.runtime.protocol import decode, encode
from runtime_fixtures import build_tiny_llama, dealer, free_port, wait_until

psutil = pytest.importorskip("psutil", reason="Ray brings psutil; without Ray there is no cluster to test")
pytest.importorskip("ray", reason="the cluster is an optional extra (pip install 'gllm[cluster]')")

STARTING = "starting 1 replica(s)"
EXIT_TIMEOUT_S = 240.0  # the clean-up's own 30 s limit, on a slow machine


def start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``gllm serve --replicas 1`` on its own Ray instance, whose one replica never finishes starting: its
    adapter's config is a named pipe that nobody writes to."""
    model = build_tiny_llama(tmp_path / "tiny")
    adapter = tmp_path / "stuck"
    adapter.mkdir()
    os.mkfifo(adapter / "adapter_config.json")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gllm", "serve", "--model", str(model), "--bind", f"tcp://127.0.0.1:{free_port()}",
             "--replicas", "1", "--threads", "1", "--dtype", "float32", "--adapter", f"stuck={adapter}"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        wait_until(lambda: proc.poll() is not None or STARTING in log.read_text(errors="replace"), timeout=300)
    except BaseException:
        proc.kill()
        raise
    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    return proc, log


def stop(proc: subprocess.Popen, log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit within {EXIT_TIMEOUT_S} s of SIGTERM:\n{log.read_text(errors='replace')[-3000:]}")
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "stopped while the replicas were starting" in text, text[-3000:]
    return text


def test_sigterm_while_the_replicas_start_ends_the_start_up_and_its_ray(tmp_path):
    proc, log = start(tmp_path)
    time.sleep(2)  # the replica's actor is starting (and stuck)
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    assert ray_processes  # the Ray instance it started: its GCS, raylet, workers
    stop(proc, log)
    wait_until(lambda: not any(map(alive, ray_processes)), timeout=120)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_after_ray_vanished_still_exits(tmp_path):
    proc, log = start(tmp_path)
    for child in psutil.Process(proc.pid).children(recursive=True):  # Ray is gone: killed, all of it
        child.kill()
    text = stop(proc, log)
    assert "leaving it" in text  # the clean-up could not reach Ray and was not waited for past its limit


def test_joins_a_cluster_started_with_ray_start(tmp_path):
    """``ray start --head`` (token authentication on, Ray 2.60), then ``gllm serve --ray-address`` from an
    environment that says nothing about it: the front end connects and serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as from a fresh shell
    ray = str(Path(sys.executable).parent / "ray")
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard",
                           "false", "--temp-dir", temp], env=env, capture_output=True, text=True)  # fmt: skip
    assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
    try:
        model = build_tiny_llama(tmp_path / "tiny")
        env["PYTHONUNBUFFERED"] = "1"
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gllm", "serve", "--model", str(model), "--bind", endpoint,
                                     "--replicas", "1", "--threads", "1", "--dtype", "float32",
                                     "--ray-address", f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            sock = dealer(endpoint)
            try:
                def pong():
                    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                    sock.send(encode({"type": "info", "id": "up?"}))
                    reply = sock.poll(1000) and decode(sock.recv())
                    return reply and reply["stats"]["replicas_healthy"] == 1 and reply
                info = wait_until(pong, timeout=300)
            finally:
                sock.close(linger=0)
            assert info["type"] == "info" and info["replicas"][0]["healthy"]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(EXIT_TIMEOUT_S) == 0, log.read_text(errors="replace")[-3000:]
    finally:  # this cluster's processes only (``ray stop`` would end every Ray on the machine)
        for process in psutil.process_iter(["cmdline"]):
            if any(temp in part for part in process.info["cmdline"] or ()):
                process.kill()
        shutil.rmtree(temp, ignore_errors=True)
