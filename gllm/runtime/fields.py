"""The checks of protocol v1's request fields: each takes a decoded value and returns the value to use, or
raises ``Invalid`` saying what is wrong (``gllm.runtime.protocol`` adds the field's name). Kept apart from
the message schemas that combine them; like them, free of torch and zmq.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from typing import Any, Union

MAX_ID_CHARS = 256
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1

ClientId = Union[str, int]


class Invalid(Exception):
    """Raised by a field check; the caller adds the field name and turns it into a ``ProtocolError``."""


brief = reprlib.Repr()
brief.maxstring = brief.maxother = 40
brief.maxlevel = 2

_TYPE_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", bytes: "binary", list: "array",
               dict: "map", type(None): "nil"}


def describe(value: Any) -> str:
    """A short, safe description of a decoded value for error messages (bounded for huge or deep values)."""
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return kind if isinstance(value, (list, dict)) else f"{kind} {brief.repr(value)}"


Check = Callable[[Any], Any]  # returns the value to use, raises Invalid saying what is wrong


def integer(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise Invalid(f"must be an integer, got {describe(v)}")
        if not lo <= v <= hi:
            raise Invalid(f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def number(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise Invalid(f"must be a number, got {describe(v)}")
        v = float(v)
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise Invalid(f"must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}")
        return v
    return check


def string(max_chars: int | None = None, nonempty: bool = False) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise Invalid(f"must be a string, got {describe(v)}")
        if nonempty and not v:
            raise Invalid("must not be empty")
        if max_chars is not None and len(v) > max_chars:
            raise Invalid(f"must be at most {max_chars} characters, got {len(v)}")
        return v
    return check


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid(f"must be true or false, got {describe(v)}")
    return v


def array_of(item: Check, *, max_items: int | None = None, nonempty: bool = False) -> Check:
    def check(v: Any) -> list:
        if not isinstance(v, list):
            raise Invalid(f"must be an array, got {describe(v)}")
        if nonempty and not v:
            raise Invalid("must not be empty")
        if max_items is not None and len(v) > max_items:
            raise Invalid(f"must have at most {max_items} entries, got {len(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except Invalid as exc:
                raise Invalid(f"entry {i} {exc}") from None
        return out
    return check


token_ids = array_of(integer(0, INT32_MAX), nonempty=True)


def client_id(v: Any) -> ClientId:
    if isinstance(v, str):
        return string(MAX_ID_CHARS)(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise Invalid(f"must be a string or an integer, got {describe(v)}")


def chat_message(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise Invalid(f"must be a map with 'role' and 'content', got {describe(v)}")
    extra = [k for k in v if k not in ("role", "content")]
    if extra:
        raise Invalid(f"has unknown field {describe(extra[0])} (a chat message has only 'role' and 'content')")
    for key in ("role", "content"):
        if not isinstance(v.get(key), str):
            raise Invalid(f"needs a string {key!r}, got {describe(v.get(key))}")
    return {"role": v["role"], "content": v["content"]}


def candidate(v: Any) -> str | list[int]:
    if isinstance(v, str):
        return string(nonempty=True)(v)
    if isinstance(v, list):
        return token_ids(v)
    raise Invalid(f"must be a non-empty string or an array of token ids, got {describe(v)}")


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str:
        if v not in choices:
            raise Invalid(f"must be one of {', '.join(map(repr, choices))}, got {describe(v)}")
        return v
    return check


def binary(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise Invalid(f"must be msgpack bin (bytes), got {describe(v)}")
    return v


# Structured output ------------------------------------------------------------------------------------
GRAMMAR_SYNTAXES = ("gbnf", "lark")


def json_schema(v: Any) -> dict[str, Any] | bool:
    """A JSON Schema as a map, as JSON text (deep schemas need not count against max_nesting_depth), or
    true (any JSON object)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as exc:
            raise Invalid(f"is not valid JSON text ({exc})") from None
    if v is True or isinstance(v, dict):
        return v
    raise Invalid(f"must be a JSON Schema (a map, or JSON text of one) or true, got {describe(v)}")


def tool(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise Invalid(f"must be a map with name, description, parameters, got {describe(v)}")
    extra = [k for k in v if k not in ("name", "description", "parameters")]
    if extra:
        raise Invalid(f"has unknown field {describe(extra[0])} (a tool has name, description, parameters)")
    out = {"name": string(nonempty=True)(v.get("name"))}
    if v.get("description") is not None:
        out["description"] = string()(v["description"])
    if v.get("parameters") is not None:
        params = json_schema(v["parameters"])
        if params is True:
            raise Invalid("parameters must be a JSON Schema object")
        out["parameters"] = params
    return out


# LoRA adapters --------------------------------------------------------------------------------------
MAX_ADAPTER_NAME_CHARS = 64
MAX_PATH_CHARS = 4096
adapter_name = string(MAX_ADAPTER_NAME_CHARS, nonempty=True)  # its characters: the engine checks them
file_path = string(MAX_PATH_CHARS, nonempty=True)  # a path on the runtime's machine (load_adapter)
