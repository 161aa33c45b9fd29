"""The runtime: one ZeroMQ ROUTER socket in front of one ``LLMEngine``, driven by one loop.

Each turn of the loop takes every message that has arrived, runs one engine step, and sends what the step
produced. While the engine has work the sockets are polled without waiting; when it is idle the loop
blocks on them (with a short timeout, so that a shutdown request is noticed). The engine never waits on a
client: every send is non-blocking, and a client that is gone or stops reading has its requests cancelled.

How a vanished client is noticed, all by libzmq itself:
* the socket monitor's ``DISCONNECTED`` events, mapped to routing ids by ``ConnectionTracker``. A killed
  process's connections are closed by the OS, so its requests are cancelled within milliseconds;
* ZMTP heartbeats: a peer that stops answering PINGs (host gone, network cut) is disconnected after
  ``HEARTBEAT_TIMEOUT_MS``, which again produces a ``DISCONNECTED`` event;
* ``ROUTER_MANDATORY``: a send to a peer that is no longer connected raises instead of dropping silently.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import zmq

from gllm.engine import GenerationRequest, GenerationResult, LLMEngine, ScoreRequest, ScoreResult, TokenDelta
from gllm.runtime import protocol
from gllm.runtime.connections import ConnectionTracker
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import ProtocolError
from gllm.runtime.requests import OpenRequests

log = logging.getLogger(__name__)

IDLE_POLL_MS = 100  # how long an idle loop blocks before it looks at the shutdown flag again
MAX_DRAIN = 1024  # messages taken per turn, so a flood cannot starve the engine
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
SEND_HWM = 100_000  # queued replies per client before it counts as not reading
CLOSE_LINGER_MS = 1000  # time given to the last replies to leave at shutdown
MAX_STEP_FAILURES = 3  # consecutive failed engine steps before the server gives up


class Server:
    """Serves one engine on one endpoint until ``stop`` is called (twice to skip the grace period)."""

    def __init__(self, engine: LLMEngine, endpoint: str, limits: ServerLimits = ServerLimits(),
                 context: zmq.Context | None = None):
        self.engine = engine
        self.limits = limits
        self.requests = OpenRequests()
        context = context or zmq.Context.instance()
        self.socket = self._bind(context, endpoint)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.connections = ConnectionTracker(self.socket, context)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self.connections.socket, zmq.POLLIN)
        self._stop_requests = 0
        self._deadline: float | None = None
        self._step_failures = 0
        self._token_texts: dict[int, str] = {}
        self._counters: collections.Counter[str] = collections.Counter()

    def _bind(self, context: zmq.Context, endpoint: str) -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.hard_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    # ---------------------------------------------------------------------------------------- the loop
    def stop(self) -> None:
        """Ask the loop to shut down; safe to call from a signal handler. A second call ends the grace."""
        self._stop_requests += 1

    def run(self) -> None:
        log.info("serving %s on %s (protocol v%d, max_seq_len %d, %d KV blocks)", self.engine.model_name,
                 self.endpoint, protocol.PROTOCOL_VERSION, self.engine.max_seq_len,
                 self.engine.block_manager.pool.num_blocks)
        try:
            while self._keep_running():
                self._receive(0 if self.engine.has_work() else IDLE_POLL_MS)
                if self.engine.has_work():
                    self._step()
        finally:
            self.connections.close()
            self.socket.close(linger=CLOSE_LINGER_MS)
        log.info("stopped")

    def _keep_running(self) -> bool:
        if not self._stop_requests:
            return True
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.limits.shutdown_grace_s
            log.info("shutting down: %d request(s) in flight, %.1f s to finish", self.requests.num_open,
                     self.limits.shutdown_grace_s)
        if self._stop_requests > 1:
            self._deadline = min(self._deadline, now)
        if self.requests.num_open and now >= self._deadline:
            for req in self.requests.orphan_all():
                self.engine.abort(req.engine_id)
                self._send(req.peer, protocol.error_message(
                    "shutting_down", "the runtime shut down before this request finished", req.client_id))
        return self.requests.num_open > 0

    def _receive(self, timeout_ms: int) -> None:
        if not self._poller.poll(timeout_ms):
            return
        for _ in range(MAX_DRAIN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            peer = frames[0].bytes
            self.connections.seen(peer, frames[-1])
            self._handle(peer, [f.bytes for f in frames[1:]])
        for peer in self.connections.gone():
            self._counters["disconnects"] += 1
            self._drop_peer(peer)

    def _step(self) -> None:
        try:
            out = self.engine.step()
        except Exception:
            self._step_failures += 1
            log.exception("engine step failed (%d in a row)", self._step_failures)
            for req in self.requests.orphan_all():
                self.engine.abort(req.engine_id)
                self._send(req.peer, protocol.error_message(
                    "internal", "the engine failed while running this request; see the runtime's log", req.client_id))
            if self._step_failures >= MAX_STEP_FAILURES:
                raise
            return
        self._step_failures = 0
        for delta in out.deltas:
            self._on_token(delta)
        for result in out.finished:
            self._on_finished(result)

    # --------------------------------------------------------------------------------- client messages
    def _handle(self, peer: bytes, body: list[bytes]) -> None:
        request_id = None
        try:
            if len(body) != 1:
                raise ProtocolError("bad_request", f"send one frame per message (got {len(body)} frames): "
                                                   "connect with a DEALER socket and send the msgpack map alone")
            if len(body[0]) > self.limits.max_message_bytes:
                raise ProtocolError("too_long", f"the message is {len(body[0])} bytes; the limit is "
                                                f"{self.limits.max_message_bytes} bytes")
            req = protocol.parse_request(body[0])
            request_id = req.id
            self._dispatch(peer, req)
        except ProtocolError as exc:
            self._send(peer, protocol.error_message(exc.code, exc.message, exc.request_id))
        except Exception:  # a bug of ours must not take the server down with it
            log.exception("internal error while handling a message from client %s", peer.hex())
            self._send(peer, protocol.error_message(
                "internal", "the runtime failed on this message; see its log", request_id))

    def _dispatch(self, peer: bytes, req: protocol.Request) -> None:
        if isinstance(req, protocol.Ping):
            self._send(peer, protocol.pong_message(req.id))
        elif isinstance(req, protocol.Info):
            self._send(peer, self._info(req.id))
        elif isinstance(req, protocol.Cancel):
            open_req = self.requests.find(peer, req.id)
            if open_req is not None:  # unknown or finished ids are fine: cancel is idempotent
                self.engine.abort(open_req.engine_id)
        else:
            self._submit(peer, req)

    def _submit(self, peer: bytes, req: protocol.Generate | protocol.Score) -> None:
        if self._stop_requests:
            raise ProtocolError("shutting_down", "the runtime is shutting down and takes no new requests", req.id)
        if self.requests.find(peer, req.id) is not None:
            raise ProtocolError("bad_request", f"id {req.id!r} is already used by one of your open requests", req.id)
        if self.requests.count(peer) >= self.limits.max_open_requests:
            raise ProtocolError("overloaded", f"this client already has {self.limits.max_open_requests} open "
                                              "requests (the limit); wait for one to finish or cancel one", req.id)
        prompt = dict(prompt=req.prompt, messages=req.messages, prompt_token_ids=req.prompt_token_ids)
        try:
            if isinstance(req, protocol.Generate):
                open_req = self.requests.new(peer, req.id, "generate", req.logprobs)
                self.engine.add_request(GenerationRequest(
                    **prompt, max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                    top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=req.logprobs, priority=req.priority,
                    ignore_eos=req.ignore_eos, request_id=open_req.engine_id))
            else:
                open_req = self.requests.new(peer, req.id, "score")
                self.engine.add_score(ScoreRequest(**prompt, candidates=req.candidates, priority=req.priority,
                                                   request_id=open_req.engine_id))
        except ValueError as exc:
            raise ProtocolError(engine_error_code(exc), str(exc), req.id) from None
        self.requests.add(open_req)

    def _info(self, request_id: protocol.ClientId | None) -> dict[str, Any]:
        stats = {**dict.fromkeys(protocol.INFO_STATS, 0), **self.engine.stats(),
                 "open_requests": self.requests.num_open, "clients": self.requests.num_peers,
                 "disconnects": self._counters["disconnects"]}
        limits = {"max_message_bytes": self.limits.max_message_bytes,
                  "max_open_requests": self.limits.max_open_requests, "max_logprobs": protocol.MAX_LOGPROBS,
                  "max_candidates": protocol.MAX_CANDIDATES, "max_stop_strings": protocol.MAX_STOP_STRINGS}
        return protocol.info_message(request_id, self.engine.model_name, self.engine.config.vocab_size,
                                     self.engine.max_seq_len, stats, limits)

    # ---------------------------------------------------------------------------------- engine output
    def _on_token(self, delta: TokenDelta) -> None:
        req = self.requests.get(delta.request_id)
        if req is None or req.orphaned:
            return
        top = [[t, self._token_text(t), lp] for t, lp in delta.top_logprobs] if req.top_n else None
        self._send(req.peer, protocol.token_message(req.client_id, delta.index, delta.token_id, delta.text,
                                                    delta.logprob, delta.rank, top))

    def _on_finished(self, result: GenerationResult | ScoreResult) -> None:
        req = self.requests.close(result.request_id)
        if req is None:
            return
        cancelled = result.finish_reason == "aborted"
        reason = "cancelled" if cancelled else result.finish_reason
        scored = isinstance(result, ScoreResult)
        usage = {"prompt_tokens": len(result.prompt_token_ids),
                 "completion_tokens": 0 if scored else len(result.token_ids),
                 "cached_tokens": result.num_cached_tokens}
        timing = {k: result.metrics.get(k) for k in ("queued_ms", "ttft_ms", "total_ms")}
        log.info("%s client=%s id=%r %s%s prompt=%d cached=%d completion=%d queued=%sms ttft=%sms total=%sms",
                 req.kind, req.peer.hex(), req.client_id, reason, " (client gone)" if req.orphaned else "",
                 usage["prompt_tokens"], usage["cached_tokens"], usage["completion_tokens"],
                 timing["queued_ms"], timing["ttft_ms"], timing["total_ms"])
        if req.orphaned:
            return
        if scored and not cancelled:
            candidates = [{"text": c.text, "token_ids": c.token_ids, "logprob": c.logprob,
                           "token_logprobs": c.token_logprobs} for c in result.candidates]
            msg = protocol.scores_message(req.client_id, candidates, usage, timing)
        else:
            msg = protocol.done_message(req.client_id, reason, "" if scored else result.text, usage, timing)
        self._send(req.peer, msg)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = self.engine.tokenizer
            text = self._token_texts[token_id] = tokenizer.token_text(token_id) if tokenizer else ""
        return text

    # ------------------------------------------------------------------------------ sends, disconnects
    def _send(self, peer: bytes, message: dict[str, Any]) -> bool:
        """Send without blocking; a client that is gone or not reading loses its requests."""
        try:
            self.socket.send_multipart([peer, protocol.encode(message)], zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("client %s is not reading its replies; cancelling its requests", peer.hex())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
        self._drop_peer(peer)
        return False

    def _drop_peer(self, peer: bytes) -> None:
        reqs = self.requests.orphan_peer(peer)
        for req in reqs:
            self.engine.abort(req.engine_id)
        if reqs:
            log.info("client %s is gone; cancelling its %d open request(s)", peer.hex(), len(reqs))


def engine_error_code(exc: ValueError) -> str:
    """Wire code for an engine refusal. The engine raises plain ``ValueError``; its length refusals are the
    ones that name ``max_seq_len`` or say the KV cache cannot hold the request."""
    text = str(exc)
    return "too_long" if "max_seq_len" in text or "cannot hold" in text else "bad_request"
