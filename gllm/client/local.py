"""LocalRuntime: a private ``gllm serve`` for the length of a ``with`` block, always stopped afterwards.

For games and tools written in Python that ship their own runtime, and for the examples' ``--serve``: it starts the runtime on a free loopback port,
waits until it answers a ping (loading the model takes a while on a small CPU), and on the way out, by
success, error, Ctrl-C or SIGTERM, asks it to stop (SIGTERM, which the runtime handles gracefully) and
waits for it to exit. A runtime that outlived its example would hold the port and the memory.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from gllm.client.sync import Client

READY_TIMEOUT_S = 300.0  # loading the model on a busy 2-core machine can take a minute or more
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRuntime:
    """``python -m gllm serve`` as a child process; ``endpoint`` is where to connect once it is up."""

    def __init__(self, model: str | None = None, max_batch_size: int = 8, extra_args: tuple[str, ...] = ()):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.args = [sys.executable, "-m", "gllm", "serve", "--bind", self.endpoint,
                     "--max-batch-size", str(max_batch_size), "--log-level", "WARNING", *extra_args]
        if model:
            self.args += ["--model", model]
        self.log = tempfile.NamedTemporaryFile(prefix="gllm-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self._old_sigterm: signal.Handlers | None = None

    def __enter__(self) -> LocalRuntime:
        # SIGTERM would otherwise kill this process without running ``__exit__``, orphaning the runtime.
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with Client(self.endpoint) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gllm serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gllm serve did not answer within {READY_TIMEOUT_S:g} s")
                try:
                    client.ping(timeout=1.0)
                    return
                except TimeoutError:
                    pass

    def stop(self) -> int | None:
        """SIGTERM the runtime and wait for it (killing it if it hangs); returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        self.log.close()
        if self.proc.returncode == 0:  # keep the log only when something went wrong
            Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
