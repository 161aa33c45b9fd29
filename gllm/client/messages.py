"""What the Python client sends and gets back: request maps in, typed results out.

Shared by the synchronous ``Client`` and the asyncio ``AsyncClient``, which differ only in how they wait.
Options left as ``None`` are not sent, so the runtime's documented defaults apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from gllm.runtime.protocol import ClientId

Prompt = dict[str, Any]  # exactly one of prompt / messages / prompt_token_ids


class ServerError(Exception):
    """The runtime answered with an ``error`` message (see docs/protocol.md for the codes)."""

    def __init__(self, code: str, message: str, request_id: ClientId | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class RuntimeTimeout(TimeoutError):
    """No reply (or no connection to send on) within the client's timeout: the runtime is gone, frozen or
    swamped. The request is cancelled if the runtime still has it; the client stays usable, reconnects by
    itself, and its next request works once the runtime is back."""


@dataclass
class Token:
    index: int  # position in the completion, from 0
    token_id: int
    text: str  # new text; "" while a multi-byte character is incomplete
    logprob: float  # raw log-softmax of the model's logits (before temperature, top-k, top-p)
    rank: int  # 1 = the model's most likely token
    top: list[tuple[int, str, float]] | None = None  # (token_id, text, logprob), best first, when asked
    injected: int = 0  # tokens injected into the context just before this one (``Client.inject``)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served by the prefix cache
    dropped_turns: int | None = None  # chat turns left out to fit (context_overflow "drop_oldest")
    injected_tokens: int = 0  # tokens injected while it ran


@dataclass
class Timing:
    queued_ms: float | None
    ttft_ms: float | None  # None when no token was produced
    total_ms: float | None


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]  # already parsed, valid under the tool's parameters schema


@dataclass
class Completion:
    """The end of a generation: its whole text, why it ended, and every token the stream delivered."""

    id: ClientId
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: Usage
    timing: Timing
    tokens: list[Token] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    structure_complete: bool | None = None  # structured output only: False when the reply was cut short

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def logprobs(self) -> list[float]:
        return [t.logprob for t in self.tokens]


@dataclass
class Candidate:
    text: str
    token_ids: list[int]
    logprob: float  # log P(candidate | prompt): the sum of token_logprobs
    token_logprobs: list[float]


@dataclass
class Scores:
    id: ClientId
    candidates: list[Candidate]  # in the order they were given
    usage: Usage
    timing: Timing


@dataclass
class Snapshot:
    """A saved conversation: the KV of the prompt's whole blocks; give ``state`` to ``restore`` later,
    in this runtime or another one running the same model."""

    id: ClientId
    state: bytes
    tokens: int  # tokens the state holds


@dataclass
class Restored:
    id: ClientId  # a pinned state is released with this id
    tokens: int  # tokens now in the prefix cache
    pinned: bool


@dataclass
class Info:
    model: str
    vocab_size: int
    max_seq_len: int
    protocol_version: int
    stats: dict[str, Any]  # engine and runtime statistics (kv_blocks_in_use, running, waiting, ...)
    limits: dict[str, Any]
    replicas: list[dict[str, Any]] | None = None  # a cluster's replicas: id, healthy, open_requests, load
    adapters: list[str] = field(default_factory=list)  # LoRA adapters loaded, by name


def prompt_fields(prompt: str | None, messages: list[dict[str, str]] | None,
                  prompt_token_ids: list[int] | None) -> Prompt:
    given = {k: v for k, v in (("prompt", prompt), ("messages", messages), ("prompt_token_ids", prompt_token_ids))
             if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of prompt, messages, prompt_token_ids")
    return given


def request_message(kind: str, request_id: ClientId, **fields: Any) -> dict[str, Any]:
    """A ``generate``/``score``/... map; ``None`` options are left out so the runtime's defaults apply."""
    return {"type": kind, "id": request_id, **{k: v for k, v in fields.items() if v is not None}}


def check_error(msg: dict[str, Any]) -> None:
    if msg.get("type") == "error":
        raise ServerError(msg.get("code", "internal"), msg.get("message", ""), msg.get("id"))


def expect(msg: dict[str, Any], kind: str) -> dict[str, Any]:
    """``msg`` if it is of type ``kind``; raises ``ServerError`` for an error reply."""
    check_error(msg)
    if msg.get("type") != kind:
        raise ServerError("internal", f"expected a {kind!r} reply, got {msg.get('type')!r}", msg.get("id"))
    return msg


def _usage(msg: dict[str, Any]) -> Usage:
    u = msg.get("usage") or {}
    return Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0), u.get("cached_tokens", 0),
                 u.get("dropped_turns"), u.get("injected_tokens", 0))


def _timing(msg: dict[str, Any]) -> Timing:
    t = msg.get("timing") or {}
    return Timing(t.get("queued_ms"), t.get("ttft_ms"), t.get("total_ms"))


class StreamState:
    """Turns the messages of one generation into ``Token``s and, at its end, a ``Completion``."""

    def __init__(self, request_id: ClientId):
        self.id = request_id
        self.tokens: list[Token] = []
        self.result: Completion | None = None

    def feed(self, msg: dict[str, Any]) -> Union[Token, Completion]:
        check_error(msg)
        if msg.get("type") == "token":
            top = msg.get("top")
            token = Token(msg["index"], msg["token_id"], msg["text"], msg["logprob"], msg["rank"],
                          [tuple(t) for t in top] if top is not None else None, msg.get("injected", 0))
            self.tokens.append(token)
            return token
        done = expect(msg, "done")
        calls = [ToolCall(c["name"], c["arguments"]) for c in done.get("tool_calls") or []]
        self.result = Completion(self.id, done["text"], done["finish_reason"], _usage(done), _timing(done),
                                 self.tokens, calls, done.get("structure_complete"))
        return self.result


def parse_scores(msg: dict[str, Any]) -> Scores:
    """A ``scores`` reply as ``Scores``; a cancelled score request (``done``) raises ``ServerError``."""
    check_error(msg)
    if msg.get("type") == "done":
        raise ServerError("cancelled", "the score request was cancelled", msg.get("id"))
    msg = expect(msg, "scores")
    cands = [Candidate(c["text"], c["token_ids"], c["logprob"], c["token_logprobs"]) for c in msg["candidates"]]
    return Scores(msg["id"], cands, _usage(msg), _timing(msg))


def parse_snapshot(msg: dict[str, Any]) -> Snapshot:
    """A ``snapshot`` reply; a cancelled snapshot (``done``) raises ``ServerError``."""
    check_error(msg)
    if msg.get("type") == "done":
        raise ServerError("cancelled", "the snapshot was cancelled", msg.get("id"))
    msg = expect(msg, "snapshot")
    return Snapshot(msg["id"], msg["state"], msg["tokens"])


def parse_restored(msg: dict[str, Any]) -> Restored:
    msg = expect(msg, "restored")
    return Restored(msg["id"], msg["tokens"], msg.get("pinned", False))


def parse_info(msg: dict[str, Any]) -> Info:
    msg = expect(msg, "info")
    return Info(msg["model"], msg["vocab_size"], msg["max_seq_len"], msg["protocol_version"], msg["stats"],
                msg.get("limits", {}), msg.get("replicas"), msg.get("adapters") or [])
