"""Protocol v1 between game clients and ``gllm serve``: message schemas, validation and encoding.

One ZeroMQ frame per message, holding a msgpack map with a ``type`` field. This module is the one place
that says which fields each message has, their types, defaults and limits; ``docs/protocol.md`` says the
same in words. It imports neither torch nor zmq, so the Python client can use it without the engine.

Validation is strict on purpose: a field the message type does not know is an error that names it, so a
typo such as ``max_token`` never silently falls back to a default. A field sent as nil counts as absent,
which suits bindings whose serializers write null for unset options. Sizes a server operator may choose
(stop strings, candidates, token counts, nesting depth) are checked by the runtime against its limits.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # loopback only, unless the user binds elsewhere
ERROR_CODES = ("bad_request", "unknown_type", "too_long", "overloaded", "shutting_down", "internal",
               "slow_client", "forbidden")
FINISH_REASONS = ("stop", "length", "cancelled")
# Counters an ``info`` reply's ``stats`` always carries (0 until they first count); more may come with them.
INFO_STATS = ("kv_blocks_total", "kv_blocks_in_use", "kv_blocks_cached", "running", "waiting", "open_requests",
              "clients", "disconnects", "finished_requests", "prompt_tokens", "cached_prompt_tokens",
              "generated_tokens", "steps", "preemptions")

MAX_ID_CHARS = 256
MAX_ADAPTER_NAME_CHARS = 64
MAX_PATH_CHARS = 4096
MAX_LOGPROBS = 20  # top alternatives per token
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1

ClientId = Union[str, int]


class ProtocolError(Exception):
    """A message the runtime cannot accept; becomes an ``error`` reply with this code and message."""

    def __init__(self, code: str, message: str, request_id: ClientId | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class NestingError(ProtocolError):
    """A message nested too deeply for the decoder (or for the runtime's limit)."""


class _Invalid(Exception):
    """Raised by a field check; the caller adds the field name and turns it into a ``ProtocolError``."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40
_short.maxlevel = 2

_TYPE_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", bytes: "binary", list: "array",
               dict: "map", type(None): "nil"}


def describe(value: Any) -> str:
    """A short, safe description of a decoded value for error messages (bounded for huge or deep values)."""
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return kind if isinstance(value, (list, dict)) else f"{kind} {_short.repr(value)}"


# ------------------------------------------------------------------------------------------ field checks
Check = Callable[[Any], Any]  # returns the value to use, raises _Invalid saying what is wrong


def integer(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Invalid(f"must be an integer, got {describe(v)}")
        if not lo <= v <= hi:
            raise _Invalid(f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def number(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _Invalid(f"must be a number, got {describe(v)}")
        v = float(v)
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise _Invalid(f"must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}")
        return v
    return check


def string(max_chars: int | None = None, nonempty: bool = False) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise _Invalid(f"must be a string, got {describe(v)}")
        if nonempty and not v:
            raise _Invalid("must not be empty")
        if max_chars is not None and len(v) > max_chars:
            raise _Invalid(f"must be at most {max_chars} characters, got {len(v)}")
        return v
    return check


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"must be true or false, got {describe(v)}")
    return v


def array_of(item: Check, *, max_items: int | None = None, nonempty: bool = False) -> Check:
    def check(v: Any) -> list:
        if not isinstance(v, list):
            raise _Invalid(f"must be an array, got {describe(v)}")
        if nonempty and not v:
            raise _Invalid("must not be empty")
        if max_items is not None and len(v) > max_items:
            raise _Invalid(f"must have at most {max_items} entries, got {len(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Invalid as exc:
                raise _Invalid(f"entry {i} {exc}") from None
        return out
    return check


token_ids = array_of(integer(0, INT32_MAX), nonempty=True)


def client_id(v: Any) -> ClientId:
    if isinstance(v, str):
        return string(MAX_ID_CHARS)(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise _Invalid(f"must be a string or an integer, got {describe(v)}")


def chat_message(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise _Invalid(f"must be a map with 'role' and 'content', got {describe(v)}")
    extra = [k for k in v if k not in ("role", "content")]
    if extra:
        raise _Invalid(f"has unknown field {describe(extra[0])} (a chat message has only 'role' and 'content')")
    for key in ("role", "content"):
        if not isinstance(v.get(key), str):
            raise _Invalid(f"needs a string {key!r}, got {describe(v.get(key))}")
    return {"role": v["role"], "content": v["content"]}


def candidate(v: Any) -> str | list[int]:
    if isinstance(v, str):
        return string(nonempty=True)(v)
    if isinstance(v, list):
        return token_ids(v)
    raise _Invalid(f"must be a non-empty string or an array of token ids, got {describe(v)}")


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


@dataclass
class Info:
    id: ClientId | None = None


@dataclass
class Ping:
    id: ClientId | None = None


@dataclass
class LoadAdapter:
    name: str
    path: str
    id: ClientId | None = None


@dataclass
class UnloadAdapter:
    name: str
    id: ClientId | None = None


Request = Union[Generate, Score, Cancel, Info, Ping, LoadAdapter, UnloadAdapter]

_PROMPT_CHECKS: dict[str, Check] = {
    "prompt": string(),
    "messages": array_of(chat_message, nonempty=True),
    "prompt_token_ids": token_ids,
}
_PRIORITY = integer(-INT32_MAX - 1, INT32_MAX)
_ADAPTER = string(MAX_ADAPTER_NAME_CHARS, nonempty=True)

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
        "adapter": _ADAPTER,
    }, ("id",)),
    "score": (Score, {
        "id": client_id,
        **_PROMPT_CHECKS,
        "candidates": array_of(candidate, nonempty=True),
        "priority": _PRIORITY,
        "thinking": boolean,
        "adapter": _ADAPTER,
    }, ("id", "candidates")),
    "cancel": (Cancel, {"id": client_id}, ("id",)),
    "info": (Info, {"id": client_id}, ()),
    "ping": (Ping, {"id": client_id}, ()),
    "load_adapter": (LoadAdapter, {"id": client_id, "name": _ADAPTER, "path": string(MAX_PATH_CHARS, nonempty=True)},
                     ("name", "path")),
    "unload_adapter": (UnloadAdapter, {"id": client_id, "name": _ADAPTER}, ("name",)),
}
# The envelope field every message carries besides its schema's fields.
_ENVELOPE = "type"


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
                                           f"{_short.repr(str(exc))})") from None


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
    request_id = echo_id(msg.get("id"))
    kind = msg.get(_ENVELOPE)
    if kind is None:
        raise ProtocolError("bad_request", "the message has no 'type' field", request_id)
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", f"'type' must be a string, got {describe(kind)}", request_id)
    if kind not in SCHEMAS:
        raise ProtocolError("unknown_type", f"unknown message type {_short.repr(kind)}; "
                                            f"known types: {', '.join(SCHEMAS)}", request_id)
    cls, checks, required = SCHEMAS[kind]
    unknown = [k for k in msg if k != _ENVELOPE and k not in checks]
    if unknown:
        names = ", ".join(_short.repr(k) if isinstance(k, str) else describe(k) for k in unknown[:5])
        raise ProtocolError("bad_request", f"unknown field(s) for a {kind!r} message: {names}; "
                                           f"known fields: {', '.join(checks)}", request_id)
    values: dict[str, Any] = {}
    for name, check in checks.items():
        value = msg.get(name)
        if value is None:
            if name in required:
                raise ProtocolError("bad_request", f"a {kind!r} message needs the field {name!r}", request_id)
            continue
        try:
            values[name] = check(value)
        except _Invalid as exc:
            raise ProtocolError("bad_request", f"field {name!r} {exc}", request_id) from None
    if "prompt_token_ids" in checks:
        given = [n for n in _PROMPT_CHECKS if n in values]
        if len(given) != 1:
            raise ProtocolError("bad_request", "give exactly one of 'prompt', 'messages' or 'prompt_token_ids' "
                                               f"(got {', '.join(given) or 'none'})", request_id)
    return cls(**values)


def echo_id(value: Any) -> ClientId | None:
    """The id to echo in an error reply: the message's own id when it is a valid one, else nil."""
    try:
        return client_id(value)
    except _Invalid:
        return None


# ------------------------------------------------------------------------------------- runtime replies
def token_message(request_id: ClientId, index: int, token_id: int, text: str, logprob: float, rank: int,
                  top: list[list[Any]] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "token", "id": request_id, "index": index, "token_id": token_id, "text": text,
                           "logprob": logprob, "rank": rank}
    if top is not None:
        msg["top"] = top  # [[token_id, text, logprob], ...], best first
    return msg


def done_message(request_id: ClientId, finish_reason: str, text: str, usage: dict[str, int],
                 timing: dict[str, float | None]) -> dict[str, Any]:
    return {"type": "done", "id": request_id, "finish_reason": finish_reason, "text": text, "usage": usage,
            "timing": timing}


def scores_message(request_id: ClientId, candidates: list[dict[str, Any]], usage: dict[str, int],
                   timing: dict[str, float | None]) -> dict[str, Any]:
    return {"type": "scores", "id": request_id, "candidates": candidates, "usage": usage, "timing": timing}


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
