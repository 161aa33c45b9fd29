"""Protocol v1 between game clients and ``gllm serve``: message schemas, validation and encoding.

One ZeroMQ frame per message, holding a msgpack map with a ``type`` field. This module is the one place
that says which fields each message has, their types, defaults and limits; ``docs/protocol.md`` says the
same in words. It imports neither torch nor zmq, so the Python client can use it without the engine.

Validation is strict on purpose: a field the message type does not know is an error that names it, so a
typo such as ``max_token`` never silently falls back to a default. A field sent as nil counts as absent,
which suits bindings whose serializers write null for unset options. Sizes a server operator may choose
(stop strings, candidates, token counts, nesting depth) are checked by the runtime against its limits.
The checks of single fields live in ``gllm.runtime.fields``. ``restore`` is the one message that carries
bytes (msgpack bin): a saved state, as a ``snapshot`` reply gave it (``gllm.engine.snapshot``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from gllm.runtime.fields import (  # noqa: F401  (ClientId and the limits are part of this module's API)
    INT32_MAX,
    MAX_ADAPTER_NAME_CHARS,
    MAX_ID_CHARS,
    MAX_PATH_CHARS,
    UINT64_MAX,
    Check,
    ClientId,
    Invalid,
    brief,
    adapter_name,
    array_of,
    binary,
    boolean,
    candidate,
    chat_message,
    client_id,
    describe,
    file_path,
    GRAMMAR_SYNTAXES,
    integer,
    json_schema,
    number,
    one_of,
    string,
    token_ids,
    tool,
)

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # loopback only, unless the user binds elsewhere
ERROR_CODES = ("bad_request", "unknown_type", "too_long", "overloaded", "shutting_down", "internal",
               "slow_client", "forbidden")
FINISH_REASONS = ("stop", "length", "cancelled")
# Counters an ``info`` reply's ``stats`` always carries (0 until they first count); more may come with them.
INFO_STATS = ("kv_blocks_total", "kv_blocks_in_use", "kv_blocks_cached", "running", "waiting", "open_requests",
              "clients", "disconnects", "finished_requests", "prompt_tokens", "cached_prompt_tokens",
              "generated_tokens", "steps", "preemptions", "kv_blocks_pinned", "pinned_states", "max_pinned_blocks")

MAX_LOGPROBS = 20  # top alternatives per token


class ProtocolError(Exception):
    """A message the runtime cannot accept; becomes an ``error`` reply with this code and message."""

    def __init__(self, code: str, message: str, request_id: ClientId | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class NestingError(ProtocolError):
    """A message nested too deeply for the decoder (or for the runtime's limit)."""


# ------------------------------------------------------------------------------------ client messages
@dataclass
class Generate:
    id: ClientId
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: int = 0
    priority: int = 0
    ignore_eos: bool = False
    thinking: bool = False
    json_schema: dict[str, Any] | bool | None = None
    grammar: str | None = None
    grammar_syntax: str = "gbnf"
    regex: str | None = None
    choices: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    # game state: long chats, pacing, exact replay
    context_overflow: str = "error"
    max_tokens_per_second: float | None = None
    deadline_ms: float | None = None
    deterministic: bool = False
    adapter: str | None = None


@dataclass
class Score:
    id: ClientId
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    candidates: list[str | list[int]] = field(default_factory=list)
    priority: int = 0
    thinking: bool = False
    adapter: str | None = None


@dataclass
class Cancel:
    id: ClientId


# Game state: saved conversations and events mid-line
@dataclass
class Snapshot:
    id: ClientId
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    priority: int = 0
    adapter: str | None = None  # the K/V is computed under this adapter, and the state records it


@dataclass
class Restore:
    id: ClientId
    state: bytes = b""
    pin: bool = False


@dataclass
class Release:
    id: ClientId


@dataclass
class Inject:
    id: ClientId
    text: str | None = None
    token_ids: list[int] | None = None


@dataclass
class Info:
    id: ClientId | None = None


@dataclass
class Ping:
    id: ClientId | None = None


# LoRA adapters loaded and unloaded while the runtime serves (``gllm.runtime.adapters``)
@dataclass
class LoadAdapter:
    name: str
    path: str
    id: ClientId | None = None


@dataclass
class UnloadAdapter:
    name: str
    id: ClientId | None = None


Request = Union[Generate, Score, Cancel, Info, Ping, Snapshot, Restore, Release, Inject, LoadAdapter, UnloadAdapter]
# The messages that open a request: it stays open until one of the ``FINAL_REPLIES`` answers it.
OPENING = (Generate, Score, Snapshot, Restore)
FINAL_REPLIES = ("done", "scores", "snapshot", "restored", "error")

_PROMPT_CHECKS: dict[str, Check] = {
    "prompt": string(),
    "messages": array_of(chat_message, nonempty=True),
    "prompt_token_ids": token_ids,
}
_PRIORITY = integer(-INT32_MAX - 1, INT32_MAX)
CONTEXT_OVERFLOW = ("error", "drop_oldest")
# Messages that name another message's request: an error answering them carries a nil id, since that
# request goes on (and ids of bad messages are echoed only for the requests they open or end).
_NAMES_OTHER_REQUEST = ("inject", "release")

# type -> (dataclass, {field: check}, required fields). Every field a type knows is listed here.
SCHEMAS: dict[str, tuple[type, dict[str, Check], tuple[str, ...]]] = {
    "generate": (Generate, {
        "id": client_id,
        **_PROMPT_CHECKS,
        "max_tokens": integer(1, INT32_MAX),
        "temperature": number(0.0, 1e6),
        "top_k": integer(0, INT32_MAX),
        "top_p": number(0.0, 1.0, lo_open=True),
        "seed": integer(0, UINT64_MAX),
        "stop": array_of(string(nonempty=True)),
        "logprobs": integer(0, MAX_LOGPROBS),
        "priority": _PRIORITY,
        "ignore_eos": boolean,
        "thinking": boolean,
        "json_schema": json_schema,
        "grammar": string(nonempty=True),
        "grammar_syntax": one_of(*GRAMMAR_SYNTAXES),
        "regex": string(nonempty=True),
        "choices": array_of(string(nonempty=True), nonempty=True),
        "tools": array_of(tool, nonempty=True),
        "tool_choice": string(nonempty=True),
        "context_overflow": one_of(*CONTEXT_OVERFLOW),
        "max_tokens_per_second": number(0.0, 1e6, lo_open=True),
        "deadline_ms": number(0.0, 1e9),
        "deterministic": boolean,
        "adapter": adapter_name,
    }, ("id",)),
    "score": (Score, {
        "id": client_id,
        **_PROMPT_CHECKS,
        "candidates": array_of(candidate, nonempty=True),
        "priority": _PRIORITY,
        "thinking": boolean,
        "adapter": adapter_name,
    }, ("id", "candidates")),
    "cancel": (Cancel, {"id": client_id}, ("id",)),
    "snapshot": (Snapshot, {"id": client_id, **_PROMPT_CHECKS, "priority": _PRIORITY, "adapter": adapter_name},
                 ("id",)),
    "restore": (Restore, {"id": client_id, "state": binary, "pin": boolean}, ("id", "state")),
    "release": (Release, {"id": client_id}, ("id",)),
    "inject": (Inject, {"id": client_id, "text": string(), "token_ids": token_ids}, ("id",)),
    "info": (Info, {"id": client_id}, ()),
    "ping": (Ping, {"id": client_id}, ()),
    "load_adapter": (LoadAdapter, {"id": client_id, "name": adapter_name, "path": file_path},
                     ("name", "path")),
    "unload_adapter": (UnloadAdapter, {"id": client_id, "name": adapter_name}, ("name",)),
}
# Fields any client message may carry besides its schema's: its type, and the key that a cluster's front end
# routes by (``affinity``: messages with the same key go to the same replica while it is healthy). One
# process has nothing to route, so it checks the key and ignores it.
_ENVELOPE = "type"
_AFFINITY = "affinity"


def encode(message: dict[str, Any]) -> bytes:
    """One message as msgpack bytes (str as msgpack str, bytes as bin; no extension types)."""
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes) -> Any:
    """msgpack bytes to Python values; raises ``ProtocolError`` for anything that is not one msgpack value."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
    except (msgpack.StackError, RecursionError):
        raise NestingError("bad_request", "the message is nested too deeply to decode") from None
    except Exception as exc:  # ExtraData, StackError (deep nesting), UnicodeDecodeError, unhashable keys...
        raise ProtocolError("bad_request", f"the message is not valid msgpack ({type(exc).__name__}: "
                                           f"{brief.repr(str(exc))})") from None


def peek_type(frame: bytes) -> Any:
    """The ``type`` of a message map, read without decoding its other values (a large ``restore``'s state
    is skipped over, not copied); None when the frame is not a map with one."""
    unpacker = msgpack.Unpacker(io.BytesIO(frame), raw=False, read_size=4096)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == _ENVELOPE:
                return unpacker.unpack()
            unpacker.skip()
    except Exception:  # not a map, not msgpack, or nested beyond msgpack's own stack
        return None
    return None


def nesting_depth(value: Any, limit: int) -> int:
    """How many maps and arrays lie inside each other in a decoded value (a flat map is 1), counting no
    further than ``limit + 1``. A loop, not recursion, so no depth can exhaust the stack."""
    deepest, todo = 0, [(value, 1)]
    while todo and deepest <= limit:
        v, depth = todo.pop()
        children = v if isinstance(v, (list, tuple)) else [*v, *v.values()] if isinstance(v, dict) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if not _CONTAINERS.isdisjoint(map(type, children)):  # checked in C: long flat arrays stay cheap
            todo.extend((c, depth + 1) for c in children if type(c) in _CONTAINERS)
    return deepest


_CONTAINERS = frozenset((list, tuple, dict))


def parse_request(frame: bytes) -> Request:
    """Decode and validate one client message; raises ``ProtocolError`` naming the first problem."""
    return validate(decode(frame))


def validate(msg: Any) -> Request:
    """Check one decoded client message against its schema; raises ``ProtocolError`` naming the first problem."""
    if not isinstance(msg, dict):
        raise ProtocolError("bad_request", f"a message must be a msgpack map with a 'type' field, got {describe(msg)}")
    kind = msg.get(_ENVELOPE)
    request_id = None if kind in _NAMES_OTHER_REQUEST else echo_id(msg.get("id"))
    if kind is None:
        raise ProtocolError("bad_request", "the message has no 'type' field", request_id)
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", f"'type' must be a string, got {describe(kind)}", request_id)
    if kind not in SCHEMAS:
        raise ProtocolError("unknown_type", f"unknown message type {brief.repr(kind)}; "
                                            f"known types: {', '.join(SCHEMAS)}", request_id)
    cls, checks, required = SCHEMAS[kind]
    unknown = [k for k in msg if k not in (_ENVELOPE, _AFFINITY) and k not in checks]
    if unknown:
        names = ", ".join(brief.repr(k) if isinstance(k, str) else describe(k) for k in unknown[:5])
        raise ProtocolError("bad_request", f"unknown field(s) for a {kind!r} message: {names}; "
                                           f"known fields: {', '.join(checks)}", request_id)
    if msg.get(_AFFINITY) is not None:
        try:
            client_id(msg[_AFFINITY])
        except Invalid as exc:
            raise ProtocolError("bad_request", f"field {_AFFINITY!r} {exc}", request_id) from None
    values: dict[str, Any] = {}
    for name, check in checks.items():
        value = msg.get(name)
        if value is None:
            if name in required:
                raise ProtocolError("bad_request", f"a {kind!r} message needs the field {name!r}", request_id)
            continue
        try:
            values[name] = check(value)
        except Invalid as exc:
            raise ProtocolError("bad_request", f"field {name!r} {exc}", request_id) from None
    if "prompt_token_ids" in checks:
        given = [n for n in _PROMPT_CHECKS if n in values]
        if len(given) != 1:
            raise ProtocolError("bad_request", "give exactly one of 'prompt', 'messages' or 'prompt_token_ids' "
                                               f"(got {', '.join(given) or 'none'})", request_id)
    if kind == "inject" and ("text" in values) == ("token_ids" in values):
        raise ProtocolError("bad_request", f"an 'inject' for id {values['id']!r} needs exactly one of 'text' or "
                                           "'token_ids'", request_id)
    if values.get("context_overflow") == "drop_oldest" and "messages" not in values:
        raise ProtocolError("bad_request", "context_overflow 'drop_oldest' drops chat turns: it needs 'messages'",
                            request_id)
    return cls(**values)


def affinity_of(msg: dict[str, Any]) -> ClientId | None:
    """The ``affinity`` key of a validated message, if it has one."""
    return msg.get(_AFFINITY)


def echo_id(value: Any) -> ClientId | None:
    """The id to echo in an error reply: the message's own id when it is a valid one, else nil."""
    try:
        return client_id(value)
    except Invalid:
        return None


# ------------------------------------------------------------------------------------- runtime replies
def token_message(request_id: ClientId, index: int, token_id: int, text: str, logprob: float, rank: int,
                  top: list[list[Any]] | None = None, injected: int = 0) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "token", "id": request_id, "index": index, "token_id": token_id, "text": text,
                           "logprob": logprob, "rank": rank}
    if top is not None:
        msg["top"] = top  # [[token_id, text, logprob], ...], best first
    if injected:
        msg["injected"] = injected  # tokens injected into the context right before this one
    return msg


def done_message(request_id: ClientId, finish_reason: str, text: str, usage: dict[str, int],
                 timing: dict[str, float | None], tool_calls: list[dict[str, Any]] | None = None,
                 structure_complete: bool | None = None) -> dict[str, Any]:
    """``tool_calls`` ([{name, arguments}]) go in when there are any, ``structure_complete`` when the
    request constrained its output."""
    msg = {"type": "done", "id": request_id, "finish_reason": finish_reason, "text": text, "usage": usage,
           "timing": timing}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    if structure_complete is not None:
        msg["structure_complete"] = structure_complete
    return msg


def scores_message(request_id: ClientId, candidates: list[dict[str, Any]], usage: dict[str, int],
                   timing: dict[str, float | None]) -> dict[str, Any]:
    return {"type": "scores", "id": request_id, "candidates": candidates, "usage": usage, "timing": timing}


def snapshot_message(request_id: ClientId, state: bytes, tokens: int) -> dict[str, Any]:
    return {"type": "snapshot", "id": request_id, "state": state, "tokens": tokens}


def restored_message(request_id: ClientId, tokens: int, pinned: bool) -> dict[str, Any]:
    return {"type": "restored", "id": request_id, "tokens": tokens, "pinned": pinned}


def error_message(code: str, message: str, request_id: ClientId | None = None) -> dict[str, Any]:
    assert code in ERROR_CODES, code
    return {"type": "error", "id": request_id, "code": code, "message": message}


def info_message(request_id: ClientId | None, model: str, vocab_size: int, max_seq_len: int,
                 stats: dict[str, Any], limits: dict[str, Any], adapters: list[str] = ()) -> dict[str, Any]:
    return {"type": "info", "id": request_id, "model": model, "vocab_size": vocab_size, "max_seq_len": max_seq_len,
            "protocol_version": PROTOCOL_VERSION, "stats": stats, "limits": limits, "adapters": list(adapters)}


def adapters_message(request_id: ClientId | None, adapters: list[str]) -> dict[str, Any]:
    """The reply to ``load_adapter`` and ``unload_adapter``: the adapters loaded now, by name."""
    return {"type": "adapters", "id": request_id, "adapters": adapters}


def pong_message(request_id: ClientId | None) -> dict[str, Any]:
    return {"type": "pong", "id": request_id}
