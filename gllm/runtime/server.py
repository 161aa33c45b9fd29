"""The runtime: one ZeroMQ ROUTER socket in front of one ``LLMEngine``, driven by one loop.

Each turn of the loop takes every message that has arrived, runs one engine step, and sends what the step
produced. While the engine has work the sockets are polled without waiting; when it is idle the loop
blocks on them (with a short timeout, so that a shutdown request is noticed). The engine never waits on a
client: every send is non-blocking. Replies that a slow reader cannot take yet wait in its outbox (see
``outbox``) and are retried every turn; a client that is gone, or that stays behind past the outbox's bounds
(``slow_client``), has its requests cancelled.

How a vanished client is noticed, all by libzmq itself:
* the socket monitor's ``DISCONNECTED`` events, mapped to routing ids by ``ConnectionTracker``. A killed
  process's connections are closed by the OS, so its requests are cancelled within milliseconds;
* ZMTP heartbeats: a peer that stops answering PINGs (host gone, network cut) is disconnected, which again
  produces a ``DISCONNECTED`` event. A PING waits behind the replies a peer has not read, so a slow reader
  cannot answer either: the timeout is twice ``slow_client_timeout_s``, leaving a slow reader the time to be
  cut off by its outbox's bounds (freeing its blocks) and still read its ``slow_client`` errors;
* ``ROUTER_MANDATORY``: a send to a peer that is no longer connected raises instead of dropping silently.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import time
from typing import Any, TypeVar

import zmq

from gllm.engine import GenerationRequest, GenerationResult, LLMEngine, ScoreRequest, ScoreResult, TokenDelta
from gllm.runtime import adapters, admission, protocol
from gllm.runtime.access import CurveServer, is_local
from gllm.runtime.connections import ConnectionTracker
from gllm.runtime.limits import ServerLimits
from gllm.runtime.outbox import Outboxes
from gllm.runtime.protocol import ProtocolError
from gllm.runtime.requests import OpenRequests

log = logging.getLogger(__name__)

Prompted = TypeVar("Prompted", GenerationRequest, ScoreRequest)
IDLE_POLL_MS = 100  # how long an idle loop blocks before it looks at the shutdown flag again
MAX_DRAIN = 1024  # messages taken per turn, so a flood cannot starve the engine
HEARTBEAT_IVL_MS = 1000
MIN_HEARTBEAT_TIMEOUT_MS = 3000
# libzmq's own queue and the kernel's socket buffer per client are kept small, so that a backlog waits in the
# client's outbox, where its bounds apply, rather than in megabytes of auto-sized kernel buffer.
SEND_HWM = 256  # above the replies one step makes for a client (one per open request)
SEND_BUFFER_BYTES = 32 << 10
FLUSH_RETRY_MS = 10  # how long an idle loop blocks while replies wait in outboxes
CLOSE_LINGER_MS = 1000  # time given to the last replies to leave when the loop ends other than by a shutdown
MAX_STEP_FAILURES = 3  # consecutive failed engine steps before the server gives up


class Server:
    """Serves one engine on one endpoint until ``stop`` is called.

    Shutdown has two phases. The grace period (``shutdown_grace_s``): no new requests, the open ones run on;
    at its end those still open are cancelled and their clients get ``shutting_down``. The drain
    (``shutdown_drain_s`` more): nothing runs, but replies still waiting for clients (a slow reader's
    backlog, then its ``done`` or error) are delivered as the clients read them. The loop ends as soon as
    nothing is open and every reply has been read (or at least taken by the OS, where it cannot tell), and
    at the latest when the drain ends. A second ``stop`` ends the grace period at once, a third the drain.
    """

    def __init__(self, engine: LLMEngine, endpoint: str, limits: ServerLimits = ServerLimits(),
                 context: zmq.Context | None = None, curve: CurveServer | None = None):
        self.engine = engine
        self.limits = limits
        self.adapter_loading = curve is not None or is_local(endpoint)  # clients make the runtime read files
        self.requests = OpenRequests()
        # A context of its own unless one is given: ending it at shutdown is what makes libzmq deliver the
        # replies still queued in it (within the linger time) before the process leaves.
        self._own_context = context is None
        context = context or zmq.Context()
        self._authenticator = curve.start_authenticator(context) if curve else None
        self.socket = self._bind(context, endpoint, curve)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.connections = ConnectionTracker(self.socket, context)
        self.outboxes = Outboxes(self.socket, limits.max_outbox_bytes, limits.slow_client_timeout_s)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self.connections.socket, zmq.POLLIN)
        self._stop_requests = 0
        self._grace_end: float | None = None  # set by the first stop
        self._drain_end: float | None = None
        self._draining = False
        self._quiet_checks = 0  # drain checks in a row that found nothing left to deliver
        self._step_failures = 0
        self._token_texts: dict[int, str] = {}
        self._counters: collections.Counter[str] = collections.Counter()

    def _bind(self, context: zmq.Context, endpoint: str, curve: CurveServer | None) -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        if curve:
            curve.apply(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.hard_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(MIN_HEARTBEAT_TIMEOUT_MS,
                                                   int(2000 * self.limits.slow_client_timeout_s)))
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.SNDBUF, SEND_BUFFER_BYTES)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            if self._authenticator:
                self._authenticator.stop()
            if self._own_context:
                context.term()
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
                self._receive(self._wait_ms())
                if self.engine.has_work():
                    self._step()
                self._flush()
        finally:
            self.connections.close()
            self.socket.close(linger=self._linger_ms())
            if self._authenticator:
                self._authenticator.stop()
            if self._own_context:
                self.socket.context.term()  # returns once the queued replies are out or the linger is over
        log.info("stopped")

    def _keep_running(self) -> bool:
        if not self._stop_requests:
            return True
        now = time.monotonic()
        if self._grace_end is None:
            self._grace_end = now + self.limits.shutdown_grace_s
            self._drain_end = self._grace_end + self.limits.shutdown_drain_s
            log.info("shutting down: %d request(s) in flight, %.1f s to finish", self.requests.num_open,
                     self.limits.shutdown_grace_s)
        if self._stop_requests > 1:
            self._grace_end = min(self._grace_end, now)
        if self._stop_requests > 2:
            self._drain_end = min(self._drain_end, now)
        if self.requests.num_open and now >= self._grace_end:
            for req in self.requests.orphan_all():
                self.engine.abort(req.engine_id)
                self._send(req.peer, protocol.error_message(
                    "shutting_down", "the runtime shut down before this request finished", req.client_id))
        if self.requests.num_open:
            return True
        if not self._draining:
            self._draining = True
            log.info("grace period over; replies wait for %d client(s), for at most %.1f s",
                     self.outboxes.num_clients, max(0.0, self._drain_end - now))
        if now >= self._drain_end:
            return False
        if self.outboxes.pending or self.connections.unread_bytes():
            self._quiet_checks = 0
            return True
        # Nothing in the outboxes nor in the OS's queues. libzmq hands its queue to the OS as soon as there is
        # room, so a second look a turn later confirms that it holds nothing either.
        self._quiet_checks += 1
        return self._quiet_checks < 2

    def _linger_ms(self) -> int:
        """How long libzmq may still deliver queued replies once the loop has ended: until the drain ends."""
        if self._drain_end is None:
            return CLOSE_LINGER_MS
        return max(0, int(1000 * (self._drain_end - time.monotonic())))

    def _wait_ms(self) -> int:
        """How long to block for messages: not at all while the engine has work. A ROUTER's POLLOUT means
        *some* client has room, so it cannot wait for a slow one: outboxes are retried on a short timer."""
        if self.engine.has_work():
            return 0
        return FLUSH_RETRY_MS if self.outboxes.pending else IDLE_POLL_MS

    def _receive(self, timeout_ms: int) -> None:
        if not self._poller.poll(timeout_ms):
            return
        for _ in range(MAX_DRAIN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            peer = frames[0].bytes
            if not self.connections.admits(peer, self.limits.max_clients):
                self._refuse_client(peer, frames[-1].bytes)
                continue
            self.connections.seen(peer, frames[-1])
            self._handle(peer, [f.bytes for f in frames[1:]])
        for peer in self.connections.gone():
            self._counters["disconnects"] += 1
            self._drop_peer(peer)

    def _step(self) -> None:
        """One engine step. A fault in a batch ends only that batch's requests (the engine reports them as
        finished with reason ``error``); an exception out of ``step`` itself leaves the engine's state unknown,
        so every open request is failed, and a few in a row stop the server."""
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
            req = admission.read_request(body[0], self.limits)
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
        elif isinstance(req, (protocol.LoadAdapter, protocol.UnloadAdapter)):
            self._send(peer, adapters.handle(self.engine, req, self.adapter_loading))
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
            raise admission.over_limit("overloaded", "max_open_requests", self.limits,
                                       f"this connection already has {self.requests.count(peer)} requests open "
                                       "(wait for one to end, or cancel one)", req.id)
        prompt = dict(prompt=req.prompt, messages=req.messages, prompt_token_ids=req.prompt_token_ids)
        try:
            if isinstance(req, protocol.Generate):
                open_req = self.requests.new(peer, req.id, "generate", req.logprobs)
                self.engine.add_request(self._tokenized(GenerationRequest(
                    **prompt, max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                    top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=req.logprobs, priority=req.priority,
                    ignore_eos=req.ignore_eos, thinking=req.thinking, request_id=open_req.engine_id,
                    adapter=req.adapter), req.id))
            else:
                open_req = self.requests.new(peer, req.id, "score")
                self._check_candidates(req)
                self.engine.add_score(self._tokenized(ScoreRequest(
                    **prompt, candidates=req.candidates, priority=req.priority, thinking=req.thinking,
                    request_id=open_req.engine_id, adapter=req.adapter), req.id))
        except ValueError as exc:
            raise ProtocolError(engine_error_code(exc), str(exc), req.id) from None
        self.requests.add(open_req)

    def _tokenized(self, req: Prompted, client_id: protocol.ClientId) -> Prompted:
        """``req`` with its prompt as token ids (text is tokenized once, here), within ``max_prompt_tokens``."""
        if req.prompt_token_ids is None:
            req = dataclasses.replace(req, prompt=None, messages=None, prompt_token_ids=self.engine.prompt_ids(req))
        admission.check_prompt(len(req.prompt_token_ids), self.limits, client_id)
        return req

    def _check_candidates(self, req: protocol.Score) -> None:
        """String candidates within ``max_candidate_tokens`` (token-id ones were checked on arrival)."""
        tokenizer = self.engine.tokenizer
        for i, cand in enumerate(req.candidates):
            if isinstance(cand, str) and tokenizer is not None:
                num_tokens = len(tokenizer.encode(cand, add_special_tokens=False))
                admission.check_candidate(i, num_tokens, self.limits, req.id)

    def _refuse_client(self, peer: bytes, frame: bytes) -> None:
        """Answer a client beyond ``max_clients`` with ``overloaded``; it stays unknown to the runtime."""
        exc = admission.over_limit("overloaded", "max_clients", self.limits,
                                   f"the runtime already serves {self.limits.max_clients} clients",
                                   admission.peek_id(frame, self.limits))
        self._send(peer, protocol.error_message(exc.code, exc.message, exc.request_id))

    def _info(self, request_id: protocol.ClientId | None) -> dict[str, Any]:
        stats = {**dict.fromkeys(protocol.INFO_STATS, 0), **self.engine.stats(),
                 "open_requests": self.requests.num_open, "clients": self.requests.num_peers,
                 "disconnects": self._counters["disconnects"], "queued_replies": self.outboxes.num_replies,
                 "slow_clients": self._counters["slow_clients"], "gc_frozen_objects": gc.get_freeze_count()}
        return protocol.info_message(request_id, self.engine.model_name, self.engine.config.vocab_size,
                                     self.engine.max_seq_len, stats, admission.reported(self.limits),
                                     adapters.loaded(self.engine))

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
        if result.finish_reason == "error":
            msg = protocol.error_message("internal", f"the engine failed while running this request ({result.error}); "
                                                     "the runtime goes on", req.client_id)
        elif scored and not cancelled:
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
    def _send(self, peer: bytes, message: dict[str, Any]) -> None:
        """Send without blocking, or queue in the client's outbox; a client that is gone loses its requests."""
        if not self.outboxes.send(peer, protocol.encode(message)):
            self._drop_peer(peer)

    def _flush(self) -> None:
        """Retry the outboxes; cut off the clients that stay behind past their bounds."""
        for peer in self.outboxes.flush():
            self._drop_peer(peer)
        for peer, why in self.outboxes.stuck():
            self._cut_off(peer, why)

    def _cut_off(self, peer: bytes, why: str) -> None:
        """Cancel a slow reader's requests and swap the replies queued for it for one ``slow_client`` error
        per request. One that does not even read those is dropped."""
        reqs = self.requests.orphan_peer(peer)
        for req in reqs:
            self.engine.abort(req.engine_id)
        if self.outboxes.was_replaced(peer):
            self.outboxes.drop(peer)
            log.warning("client %s read nothing since it was cut off; dropping its replies", peer.hex())
            return
        self._counters["slow_clients"] += 1
        log.warning("client %s is too slow: %s; cancelling its %d open request(s)", peer.hex(), why, len(reqs))
        text = f"{why}: the runtime cancelled your open requests and dropped the replies queued for you"
        ids = [req.client_id for req in reqs] or [None]
        self.outboxes.replace(peer, [protocol.encode(protocol.error_message("slow_client", text, i)) for i in ids])

    def _drop_peer(self, peer: bytes) -> None:
        self.outboxes.drop(peer)
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
