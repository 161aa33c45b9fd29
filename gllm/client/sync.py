"""The synchronous Python client: ``Client`` and its token ``Stream``.

One DEALER socket carries every request of a client; replies are routed to their request by ``id``, so
several generations can be open at once and read in any order (or from several threads). Whoever waits
for a reply reads the socket and files every message it gets under its id; the others find theirs there.

    with Client() as client:
        for token in (stream := client.generate("Hello", max_tokens=32)):
            print(token.text, end="")
        print(stream.result.finish_reason)
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any, Iterator

import zmq

from gllm.client import dealer
from gllm.client.messages import (
    Completion,
    Info,
    Restored,
    RuntimeTimeout,
    Scores,
    ServerError,
    Snapshot,
    StreamState,
    Token,
    expect,
    parse_info,
    parse_restored,
    parse_scores,
    parse_snapshot,
    prompt_fields,
    request_message,
)
from gllm.runtime.keys import ClientKeys, KeySource
from gllm.runtime.protocol import DEFAULT_ENDPOINT, ClientId, decode, encode

_POLL_SLICE_MS = 50  # a waiting reader gives other threads a turn at the socket this often


class Client:
    """A connection to ``gllm serve``. ``timeout`` (seconds) bounds every wait for the next reply, and for a
    connection to send a request on; past it, ``RuntimeTimeout``. The connection survives the runtime's
    restarts: libzmq reconnects by itself, and a request made after the runtime is back works.

    For a runtime serving with CurveZMQ (``gllm serve --curve-secret-key``), pass ``server_key`` (the
    runtime's public key) and ``secret_key`` (this client's, whose public key the runtime allows), each as
    Z85 text or the path of a file from ``gllm keygen``.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 60.0,
                 context: zmq.Context | None = None, server_key: KeySource | None = None,
                 secret_key: KeySource | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._keys = ClientKeys.load(server_key, secret_key)
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        dealer.configure(self._socket)
        if self._keys:
            self._keys.apply(self._socket)
        self._socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._inbox: dict[ClientId, collections.deque[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ requests
    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt_token_ids: list[int] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: list[str] | None = None, logprobs: int | None = None,
                 priority: int | None = None, ignore_eos: bool | None = None, thinking: bool | None = None,
                 json_schema: dict[str, Any] | str | bool | None = None, grammar: str | None = None,
                 grammar_syntax: str | None = None, regex: str | None = None, choices: list[str] | None = None,
                 tools: list[dict[str, Any]] | None = None, tool_choice: str | None = None,
                 context_overflow: str | None = None, max_tokens_per_second: float | None = None,
                 deadline_ms: float | None = None, deterministic: bool | None = None,
                 affinity: ClientId | None = None, adapter: str | None = None,
                 timeout: float | None = None) -> Stream:
        """Start a generation; iterate the returned ``Stream`` for its tokens, then read ``stream.result``.

        Structured output (docs/protocol.md): at most one of ``json_schema``, ``grammar`` (GBNF, or Lark
        with ``grammar_syntax="lark"``), ``regex``, ``choices``; or ``tools`` ({name, description,
        parameters}) with ``tool_choice``. The ``Completion`` then has ``tool_calls`` and
        ``structure_complete``. ``affinity``: a key (an NPC's id) that keeps its requests on one replica
        of a cluster. ``adapter``: the name of a loaded LoRA adapter to generate with."""
        fields = prompt_fields(prompt, messages, prompt_token_ids)
        request_id = self._open("generate", timeout, **fields, max_tokens=max_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop=stop, logprobs=logprobs, priority=priority,
                                ignore_eos=ignore_eos, thinking=thinking, json_schema=json_schema, grammar=grammar,
                                grammar_syntax=grammar_syntax, regex=regex, choices=choices, tools=tools,
                                tool_choice=tool_choice, context_overflow=context_overflow,
                                max_tokens_per_second=max_tokens_per_second, deadline_ms=deadline_ms,
                                deterministic=deterministic, affinity=affinity, adapter=adapter)
        return Stream(self, request_id, self.timeout if timeout is None else timeout)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate and wait for the whole completion (same arguments as ``generate``)."""
        return self.generate(prompt, **kwargs).wait()

    def score(self, prompt: str | None = None, *, candidates: list[str | list[int]],
              messages: list[dict[str, str]] | None = None, prompt_token_ids: list[int] | None = None,
              priority: int | None = None, thinking: bool | None = None, affinity: ClientId | None = None,
              adapter: str | None = None,
              timeout: float | None = None) -> Scores:
        """Log-probability of each candidate as a continuation of the prompt, in input order."""
        fields = prompt_fields(prompt, messages, prompt_token_ids)
        request_id = self._open("score", timeout, **fields, candidates=candidates, priority=priority,
                                thinking=thinking, affinity=affinity, adapter=adapter)
        return parse_scores(self._reply(request_id, timeout))

    def snapshot(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt_token_ids: list[int] | None = None, priority: int | None = None,
                 affinity: ClientId | None = None, adapter: str | None = None,
                 timeout: float | None = None) -> Snapshot:
        """Save a conversation: the KV of the prompt's whole blocks, computed or taken from the cache
        (under ``adapter`` when given: the state records it, and restores only where it is loaded)."""
        fields = prompt_fields(prompt, messages, prompt_token_ids)
        request_id = self._open("snapshot", timeout, **fields, priority=priority, affinity=affinity, adapter=adapter)
        return parse_snapshot(self._reply(request_id, timeout))

    def restore(self, state: bytes, *, pin: bool = False, affinity: ClientId | None = None,
                timeout: float | None = None) -> Restored:
        """Put a saved state into the runtime's prefix cache; a pinned one stays until ``release(restored.id)``
        or until this client disconnects. In a cluster, give it the ``affinity`` of the requests meant to
        find it."""
        request_id = self._open("restore", timeout, state=state, pin=pin or None, affinity=affinity)
        return parse_restored(self._reply(request_id, timeout))

    def release(self, restored_id: ClientId) -> None:
        """Unpin a state restored with ``pin=True``; unknown ids are ignored."""
        self._send(request_message("release", restored_id), self.timeout)

    def inject(self, request_id: ClientId, text: str | None = None, *, token_ids: list[int] | None = None) -> None:
        """Append text or tokens to a running generation's context; it goes on from there (the next token's
        ``injected`` says so). Unknown or finished ids are ignored."""
        self._send(request_message("inject", request_id, text=text, token_ids=token_ids), self.timeout)

    def cancel(self, request_id: ClientId) -> None:
        """Ask the runtime to stop a request; its stream then ends with ``finish_reason == "cancelled"``."""
        try:
            self._send(request_message("cancel", request_id), 0)
        except RuntimeTimeout:
            pass  # no connection: the runtime cancels a lost connection's requests itself

    def info(self, timeout: float | None = None) -> Info:
        """Model, limits and live statistics of the runtime."""
        return parse_info(self._reply(self._open("info", timeout), timeout))

    def load_adapter(self, name: str, path: str, timeout: float | None = None) -> list[str]:
        """Make the runtime load a LoRA adapter from ``path`` *on its machine*; returns the adapters loaded."""
        return expect(self._reply(self._open("load_adapter", timeout, name=name, path=str(path)), timeout),
                      "adapters")["adapters"]

    def unload_adapter(self, name: str, timeout: float | None = None) -> list[str]:
        """Unload an adapter (running requests finish with it); returns the adapters still loaded."""
        return expect(self._reply(self._open("unload_adapter", timeout, name=name), timeout), "adapters")["adapters"]

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time to the runtime, in seconds."""
        start = time.perf_counter()
        expect(self._reply(self._open("ping", timeout), timeout), "pong")
        return time.perf_counter() - start

    @property
    def closed(self) -> bool:
        return self._socket.closed

    def close(self) -> None:
        """Close the socket at once (linger 0); the runtime cancels whatever was still open."""
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ plumbing
    def _open(self, kind: str, timeout: float | None, **fields: Any) -> int:
        request_id = next(self._ids)
        self._inbox[request_id] = collections.deque()
        try:
            self._send(request_message(kind, request_id, **fields), self.timeout if timeout is None else timeout)
        except BaseException:
            self._forget(request_id)
            raise
        return request_id

    def _send(self, message: dict[str, Any], timeout: float) -> None:
        """Send once a connection to the runtime is up, waiting for one at most ``timeout`` seconds."""
        body = encode(message)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                try:
                    self._socket.send(body, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RuntimeTimeout(f"no connection to {self.endpoint} within {timeout:g} s "
                                             "(is the runtime running?)") from None
                    self._socket.poll(min(_POLL_SLICE_MS, max(1, int(remaining * 1000))), zmq.POLLOUT)

    def _reply(self, request_id: ClientId, timeout: float | None) -> dict[str, Any]:
        try:
            return self._next(request_id, self.timeout if timeout is None else timeout)
        except RuntimeTimeout:
            self.cancel(request_id)  # in case the runtime still runs it
            raise
        finally:
            self._forget(request_id)

    def _next(self, request_id: ClientId, timeout: float) -> dict[str, Any]:
        """The next message for ``request_id``, reading (and filing) others' messages while waiting."""
        deadline = time.monotonic() + timeout
        queue = self._inbox[request_id]
        while not queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeTimeout(f"no reply from {self.endpoint} within {timeout:g} s")
            with self._lock:
                if queue:
                    break
                if self._socket.poll(min(_POLL_SLICE_MS, max(1, int(remaining * 1000))), zmq.POLLIN):
                    while True:
                        try:
                            self._file(decode(self._socket.recv(zmq.NOBLOCK)))
                        except zmq.Again:
                            break
        return queue.popleft()

    def _file(self, msg: Any) -> None:
        request_id = msg.get("id") if isinstance(msg, dict) else None
        box = self._inbox.get(request_id) if isinstance(request_id, (int, str)) else None
        if box is not None:  # replies to forgotten requests (closed streams) are dropped
            box.append(msg)

    def _forget(self, request_id: ClientId) -> None:
        self._inbox.pop(request_id, None)


class Stream:
    """The tokens of one generation, as they arrive. After the last one, ``result`` holds the ``Completion``.

    Leaving a ``with`` block or calling ``close`` before the end cancels the request.
    """

    def __init__(self, client: Client, request_id: int, timeout: float):
        self.client = client
        self.id = request_id
        self.timeout = timeout
        self._state = StreamState(request_id)
        self._closed = False

    @property
    def result(self) -> Completion | None:
        return self._state.result

    def __iter__(self) -> Iterator[Token]:
        return self

    def __next__(self) -> Token:
        if self._state.result is not None or self._closed:
            raise StopIteration
        try:
            item = self._state.feed(self.client._next(self.id, self.timeout))
        except ServerError:  # the request is over on the runtime's side
            self._closed = True
            self.client._forget(self.id)
            raise
        except BaseException:  # a timeout or an interrupt: stop the request
            self.close()
            raise
        if isinstance(item, Completion):
            self.client._forget(self.id)
            raise StopIteration
        return item

    def wait(self) -> Completion:
        """Read the rest of the stream and return the ``Completion``."""
        for _ in self:
            pass
        if self._state.result is None:
            raise RuntimeError("the stream was closed before it finished")
        return self._state.result

    def cancel(self) -> None:
        """Ask the runtime to stop; keep iterating to get the remaining tokens and the final result."""
        if self._state.result is None:
            self.client.cancel(self.id)

    def close(self) -> None:
        """Cancel if still running and stop listening for this request."""
        if self._state.result is None and not self._closed and not self.client.closed:
            self.client.cancel(self.id)
        self._closed = True
        self.client._forget(self.id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
