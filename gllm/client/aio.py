"""The asyncio Python client: ``AsyncClient`` and its ``AsyncStream``, on ``zmq.asyncio``.

One reader task per client reads the DEALER socket and puts each message on the queue of the request it
answers (by ``id``), so any number of generations can stream at once over one connection.

    async with AsyncClient() as client:
        stream = client.generate(messages=[{"role": "user", "content": "Hi"}], temperature=0.7)
        async for token in stream:
            print(token.text, end="")
        print(stream.result.usage)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

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


class AsyncClient:
    """A connection to ``gllm serve`` for asyncio code. ``timeout`` (seconds) bounds each wait for a reply,
    and for a connection to send a request on; past it, ``RuntimeTimeout``. libzmq reconnects by itself, so
    the client works again once a restarted runtime is back.

    For a runtime serving with CurveZMQ (``gllm serve --curve-secret-key``), pass ``server_key`` (the
    runtime's public key) and ``secret_key`` (this client's, whose public key the runtime allows), each as
    Z85 text or the path of a file from ``gllm keygen``.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 60.0,
                 context: zmq.asyncio.Context | None = None, server_key: KeySource | None = None,
                 secret_key: KeySource | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._keys = ClientKeys.load(server_key, secret_key)
        self._socket = (context or zmq.asyncio.Context.instance()).socket(zmq.DEALER)
        dealer.configure(self._socket)
        if self._keys:
            self._keys.apply(self._socket)
        self._socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._queues: dict[ClientId, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._reader: asyncio.Task[None] | None = None

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
                 timeout: float | None = None) -> AsyncStream:
        """A stream of the generation's tokens; the request is sent when the stream is first awaited.
        Structured output, ``affinity`` and ``adapter`` as for ``Client.generate``."""
        fields = prompt_fields(prompt, messages, prompt_token_ids)
        message = request_message("generate", next(self._ids), **fields, max_tokens=max_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                                  logprobs=logprobs, priority=priority, ignore_eos=ignore_eos, thinking=thinking,
                                  json_schema=json_schema, grammar=grammar, grammar_syntax=grammar_syntax,
                                  regex=regex, choices=choices, tools=tools, tool_choice=tool_choice,
                                  context_overflow=context_overflow, max_tokens_per_second=max_tokens_per_second,
                                  deadline_ms=deadline_ms, deterministic=deterministic, affinity=affinity,
                                  adapter=adapter)
        return AsyncStream(self, message, self.timeout if timeout is None else timeout)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate and wait for the whole completion (same arguments as ``generate``)."""
        return await self.generate(prompt, **kwargs).wait()

    async def score(self, prompt: str | None = None, *, candidates: list[str | list[int]],
                    messages: list[dict[str, str]] | None = None, prompt_token_ids: list[int] | None = None,
                    priority: int | None = None, thinking: bool | None = None, affinity: ClientId | None = None,
                    adapter: str | None = None,
                    timeout: float | None = None) -> Scores:
        """Log-probability of each candidate as a continuation of the prompt, in input order."""
        fields = prompt_fields(prompt, messages, prompt_token_ids)
        message = request_message("score", next(self._ids), **fields, candidates=candidates, priority=priority,
                                  thinking=thinking, affinity=affinity, adapter=adapter)
        return parse_scores(await self._request(message, timeout))

    async def snapshot(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                       prompt_token_ids: list[int] | None = None, priority: int | None = None,
                       affinity: ClientId | None = None, adapter: str | None = None,
                       timeout: float | None = None) -> Snapshot:
        """Save a conversation: the KV of the prompt's whole blocks, computed or taken from the cache
        (under ``adapter`` when given: the state records it, and restores only where it is loaded)."""
        fields = prompt_fields(prompt, messages, prompt_token_ids)
        message = request_message("snapshot", next(self._ids), **fields, priority=priority, affinity=affinity,
                                  adapter=adapter)
        return parse_snapshot(await self._request(message, timeout))

    async def restore(self, state: bytes, *, pin: bool = False, affinity: ClientId | None = None,
                      timeout: float | None = None) -> Restored:
        """Put a saved state into the runtime's prefix cache; a pinned one stays until ``release(restored.id)``
        or until this client disconnects. In a cluster, give it the ``affinity`` of the requests meant to
        find it."""
        message = request_message("restore", next(self._ids), state=state, pin=pin or None, affinity=affinity)
        return parse_restored(await self._request(message, timeout))

    async def release(self, restored_id: ClientId) -> None:
        """Unpin a state restored with ``pin=True``; unknown ids are ignored."""
        await asyncio.wait_for(self._socket.send(encode(request_message("release", restored_id))), self.timeout)

    async def inject(self, request_id: ClientId, text: str | None = None, *,
                     token_ids: list[int] | None = None) -> None:
        """Append text or tokens to a running generation's context; it goes on from there (the next token's
        ``injected`` says so). Unknown or finished ids are ignored."""
        message = request_message("inject", request_id, text=text, token_ids=token_ids)
        await asyncio.wait_for(self._socket.send(encode(message)), self.timeout)

    async def cancel(self, request_id: ClientId) -> None:
        """Ask the runtime to stop a request; its stream then ends with ``finish_reason == "cancelled"``."""
        try:  # NOBLOCK, queued behind any send still waiting for a connection
            await asyncio.wait_for(self._socket.send(encode(request_message("cancel", request_id)), zmq.NOBLOCK),
                                   self.timeout)
        except (zmq.Again, asyncio.TimeoutError):
            pass  # no connection: the runtime cancels a lost connection's requests itself

    async def info(self, timeout: float | None = None) -> Info:
        return parse_info(await self._request(request_message("info", next(self._ids)), timeout))

    async def load_adapter(self, name: str, path: str, timeout: float | None = None) -> list[str]:
        """Make the runtime load a LoRA adapter from ``path`` *on its machine*; returns the adapters loaded."""
        message = request_message("load_adapter", next(self._ids), name=name, path=str(path))
        return expect(await self._request(message, timeout), "adapters")["adapters"]

    async def unload_adapter(self, name: str, timeout: float | None = None) -> list[str]:
        """Unload an adapter (running requests finish with it); returns the adapters still loaded."""
        message = request_message("unload_adapter", next(self._ids), name=name)
        return expect(await self._request(message, timeout), "adapters")["adapters"]

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time to the runtime, in seconds."""
        start = time.perf_counter()
        expect(await self._request(request_message("ping", next(self._ids)), timeout), "pong")
        return time.perf_counter() - start

    @property
    def closed(self) -> bool:
        return self._socket.closed

    def close(self) -> None:
        """Stop the reader and close the socket at once (linger 0); the runtime cancels what was open."""
        if self._reader is not None:
            self._reader.cancel()
        self._socket.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ plumbing
    async def _open(self, message: dict[str, Any], timeout: float) -> None:
        """Send a request once a connection to the runtime is up, waiting for one at most ``timeout`` seconds."""
        self._queues[message["id"]] = asyncio.Queue()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        try:
            await asyncio.wait_for(self._socket.send(encode(message)), timeout)
        except asyncio.TimeoutError:
            self._forget(message["id"])
            raise RuntimeTimeout(f"no connection to {self.endpoint} within {timeout:g} s "
                                 "(is the runtime running?)") from None
        except BaseException:
            self._forget(message["id"])
            raise

    async def _request(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        await self._open(message, timeout)
        try:
            return await self._next(message["id"], timeout)
        except RuntimeTimeout:
            await self.cancel(message["id"])  # in case the runtime still runs it
            raise
        finally:
            self._forget(message["id"])

    async def _next(self, request_id: ClientId, timeout: float) -> dict[str, Any]:
        try:
            item = await asyncio.wait_for(self._queues[request_id].get(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeTimeout(f"no reply from {self.endpoint} within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _forget(self, request_id: ClientId) -> None:
        self._queues.pop(request_id, None)

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = decode(await self._socket.recv())
                request_id = msg.get("id") if isinstance(msg, dict) else None
                queue = self._queues.get(request_id) if isinstance(request_id, (int, str)) else None
                if queue is not None:  # replies to forgotten requests (closed streams) are dropped
                    queue.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket was closed or failed: wake every waiter with the reason
            for queue in self._queues.values():
                queue.put_nowait(ConnectionError(f"the client's connection failed: {exc}"))


class AsyncStream:
    """The tokens of one generation; after the last one, ``result`` holds the ``Completion``.

    ``async with`` it (or call ``aclose``) to cancel the request if you stop reading early.
    """

    def __init__(self, client: AsyncClient, message: dict[str, Any], timeout: float):
        self.client = client
        self.id: ClientId = message["id"]
        self.timeout = timeout
        self._message: dict[str, Any] | None = message  # until sent
        self._state = StreamState(self.id)
        self._closed = False

    @property
    def result(self) -> Completion | None:
        return self._state.result

    async def start(self) -> None:
        """Send the request now (iteration does it on its own)."""
        if self._message is not None:
            message, self._message = self._message, None
            try:
                await self.client._open(message, self.timeout)
            except BaseException:
                self._closed = True
                raise

    def __aiter__(self) -> AsyncIterator[Token]:
        return self

    async def __anext__(self) -> Token:
        if self._state.result is not None or self._closed:
            raise StopAsyncIteration
        await self.start()
        try:
            item = self._state.feed(await self.client._next(self.id, self.timeout))
        except ServerError:  # the request is over on the runtime's side
            self._closed = True
            self.client._forget(self.id)
            raise
        except BaseException:  # a timeout or a cancelled task: stop the request
            await asyncio.shield(self.aclose())
            raise
        if isinstance(item, Completion):
            self.client._forget(self.id)
            raise StopAsyncIteration
        return item

    async def wait(self) -> Completion:
        """Read the rest of the stream and return the ``Completion``."""
        async for _ in self:
            pass
        if self._state.result is None:
            raise RuntimeError("the stream was closed before it finished")
        return self._state.result

    async def cancel(self) -> None:
        """Ask the runtime to stop; keep iterating to get the remaining tokens and the final result."""
        if self._message is None and self._state.result is None:
            await self.client.cancel(self.id)

    async def aclose(self) -> None:
        """Cancel if still running and stop listening for this request."""
        if self._message is None and self._state.result is None and not self._closed and not self.client.closed:
            await self.client.cancel(self.id)
        self._closed = True
        self.client._forget(self.id)

    async def __aenter__(self) -> AsyncStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
