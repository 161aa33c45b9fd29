"""The engine side of ``gllm serve``: protocol requests into the engine, its tokens and results out as replies.

It knows no socket: replies go to a ``send(peer, message)`` callable. ``Server`` puts it behind a ZeroMQ
ROUTER; each replica of a cluster (``gllm.cluster``) runs one behind Ray Serve. So a request is handled the
same way on one process and on every replica. Message types that act on the engine belong here too
(``forward``), where both find them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from gllm.constrain import GrammarLimitError
from gllm.engine import GenerationRequest, LLMEngine, RestoreResult, ScoreRequest, SnapshotRequest, TokenDelta
from gllm.kv import PinLimitError
from gllm.runtime import adapters, admission, protocol, replies
from gllm.runtime.game_state import GameStateRequests
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import ProtocolError
from gllm.runtime.requests import OpenRequest, OpenRequests

log = logging.getLogger(__name__)

Prompted = TypeVar("Prompted", GenerationRequest, ScoreRequest, SnapshotRequest)
Opening = protocol.Generate | protocol.Score | protocol.Snapshot | protocol.Restore
Send = Callable[[bytes, dict[str, Any]], None]
MAX_STEP_FAILURES = 3  # consecutive failed engine steps before the service gives up
STRUCTURE_FIELDS = ("json_schema", "grammar", "grammar_syntax", "regex", "choices", "tools", "tool_choice")


class EngineService:
    """Opens requests on one engine and turns each step's output into ``token``, ``done``, ``scores`` and
    ``error`` replies for the peers that asked."""

    def __init__(self, engine: LLMEngine, limits: ServerLimits, send: Send, requests: OpenRequests | None = None):
        self.engine = engine
        self.limits = limits
        self.send = send
        self.requests = requests if requests is not None else OpenRequests()
        self.game = GameStateRequests(engine, self.requests, limits)
        self._step_failures = 0
        self._token_texts: dict[int, str] = {}
        # A replica's front end keeps the ids of injections, to carry them to another replica on a failover:
        # its ``token`` replies then hold them (``injected_ids``, a list per injection), beside the count.
        self.report_injected_ids = False

    # --------------------------------------------------------------------------------------- requests
    def submit(self, peer: bytes, req: Opening, resume: list[tuple[int, float, int]] | None = None,
               injected: list[tuple[int, list[int]]] | None = None) -> None:
        """Open an admitted request; ``ProtocolError`` when the engine refuses it (nothing changes then).
        ``resume``: (token id, logprob, rank) of tokens already streamed for this generation elsewhere, and
        ``injected`` the injections among them; it goes on after them (see ``GenerationRequest.resume``)."""
        prompt = {name: getattr(req, name, None) for name in ("prompt", "messages", "prompt_token_ids")}
        try:
            if isinstance(req, protocol.Restore):
                open_req = self.requests.new(peer, req.id, "restore")
                self.game.restore(open_req, req)
            elif isinstance(req, protocol.Generate):
                open_req = self.requests.new(peer, req.id, "generate", req.logprobs)
                gen = GenerationRequest(
                    **prompt, max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                    top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=req.logprobs, priority=req.priority,
                    ignore_eos=req.ignore_eos, thinking=req.thinking, resume=resume, resume_injected=injected,
                    request_id=open_req.engine_id,
                    context_overflow=req.context_overflow, max_tokens_per_second=req.max_tokens_per_second,
                    deadline_ms=req.deadline_ms, deterministic=req.deterministic, adapter=req.adapter,
                    **{name: getattr(req, name) for name in STRUCTURE_FIELDS})
                if req.context_overflow == "drop_oldest":  # the turns left out are counted here, tokenizing
                    ids, open_req.dropped_turns = self.engine.fitted_prompt(gen, self.limits.max_prompt_tokens)
                    gen = dataclasses.replace(gen, messages=None, prompt_token_ids=ids, context_overflow="error")
                self.engine.add_request(self._tokenized(gen, req.id))
            elif isinstance(req, protocol.Snapshot):
                open_req = self.requests.new(peer, req.id, "snapshot")
                self.game.snapshot(open_req, self._tokenized(SnapshotRequest(
                    **prompt, priority=req.priority, request_id=open_req.engine_id, adapter=req.adapter), req.id))
            else:
                open_req = self.requests.new(peer, req.id, "score")
                self._check_candidates(req)
                self.engine.add_score(self._tokenized(ScoreRequest(
                    **prompt, candidates=req.candidates, priority=req.priority, thinking=req.thinking,
                    request_id=open_req.engine_id, adapter=req.adapter), req.id))
        except GrammarLimitError as exc:
            raise admission.over_limit("too_long", exc.limit, self.limits, str(exc), req.id) from None
        except ValueError as exc:
            raise ProtocolError(engine_error_code(exc), str(exc), req.id) from None
        self.requests.add(open_req)

    def cancel(self, req: OpenRequest) -> None:
        """End ``req`` at the next step; its result (``cancelled``) is sent unless it is orphaned."""
        self.engine.abort(req.engine_id)

    def forward(self, peer: bytes, req: protocol.Request) -> None:
        """Message types beyond ping, info, cancel and those that open a request: ``inject``, ``release``,
        ``load_adapter`` and ``unload_adapter`` (whoever forwards these has checked that the client may)."""
        if isinstance(req, protocol.Inject):
            self.game.inject(peer, req)
        elif isinstance(req, protocol.Release):
            self.game.release(peer, req)
        elif isinstance(req, (protocol.LoadAdapter, protocol.UnloadAdapter)):
            self.send(peer, adapters.handle(self.engine, req))
        else:
            raise ProtocolError("unknown_type", f"this runtime does not handle {type(req).__name__} messages",
                                getattr(req, "id", None))

    def forget(self, peer: bytes) -> None:
        """A client that is gone keeps nothing pinned (its requests were orphaned and cancelled already)."""
        self.game.forget(peer)

    def forget_all(self) -> None:
        """Nobody is left to release any pinned state (a replica's front end is gone)."""
        self.game.forget_all()

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

    # ------------------------------------------------------------------------------------------- steps
    def step(self) -> None:
        """One engine step and its replies. A fault in a batch ends only that batch's requests (the engine
        reports them as finished with reason ``error``); an exception out of ``step`` itself leaves the
        engine's state unknown, so every open request is failed, and a few in a row are raised."""
        try:
            out = self.engine.step()
        except Exception:
            self._step_failures += 1
            log.exception("engine step failed (%d in a row)", self._step_failures)
            for req in self.requests.orphan_all():
                self.engine.abort(req.engine_id)
                self.send(req.peer, protocol.error_message(
                    "internal", "the engine failed while running this request; see the runtime's log", req.client_id))
            if self._step_failures >= MAX_STEP_FAILURES:
                raise
            return
        self._step_failures = 0
        for delta in out.deltas:
            self._on_token(delta)
        for result in out.finished:
            self._on_finished(result)

    def _on_token(self, delta: TokenDelta) -> None:
        req = self.requests.get(delta.request_id)
        if req is None or req.orphaned:
            return
        top = [[t, self._token_text(t), lp] for t, lp in delta.top_logprobs] if req.top_n else None
        msg = protocol.token_message(req.client_id, delta.index, delta.token_id, delta.text, delta.logprob,
                                     delta.rank, top, delta.injected)
        if self.report_injected_ids and delta.injected_ids:
            msg["injected_ids"] = delta.injected_ids
        self.send(req.peer, msg)

    def _on_finished(self, result: replies.Result) -> None:
        req = self.requests.close(result.request_id)
        if req is None:
            return
        if isinstance(result, RestoreResult):
            self.game.restored(req, result)
        msg, summary = replies.final_reply(req, result)
        log.info("%s client=%s id=%r %s%s", req.kind, req.peer.hex(), req.client_id, summary,
                 " (client gone)" if req.orphaned else "")
        if not req.orphaned:
            self.send(req.peer, msg)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = self.engine.tokenizer
            text = self._token_texts[token_id] = tokenizer.token_text(token_id) if tokenizer else ""
        return text

    # -------------------------------------------------------------------------------------------- info
    def model_info(self) -> dict[str, Any]:
        """What ``info`` says of the model: its name, vocabulary size, longest sequence and LoRA adapters."""
        return {"model": self.engine.model_name, "vocab_size": self.engine.config.vocab_size,
                "max_seq_len": self.engine.max_seq_len, "adapters": adapters.loaded(self.engine)}

    def stats(self) -> dict[str, Any]:
        """The engine's counters, every ``INFO_STATS`` name present."""
        return {**dict.fromkeys(protocol.INFO_STATS, 0), **self.engine.stats()}


def engine_error_code(exc: ValueError) -> str:
    """Wire code for an engine refusal. The engine raises plain ``ValueError``; its length refusals are the
    ones that name ``max_seq_len`` or say the KV cache cannot hold the request."""
    text = str(exc)
    if isinstance(exc, PinLimitError):
        return "overloaded"
    return "too_long" if "max_seq_len" in text or "cannot hold" in text else "bad_request"
