"""Admission: every size a client controls, checked against the runtime's ``ServerLimits``.

Each refusal is a ``ProtocolError`` whose message names the limit and the ``gllm serve`` option that sets
it, so a developer who hits one knows at once what to shrink or which option to raise. Checks that need
no model (message size, nesting, counts, ``max_tokens``) run here before validation is done; token counts
of text prompts and string candidates need the tokenizer, so the server calls ``check_prompt`` and
``check_candidate`` once it has them.
"""

from __future__ import annotations

from typing import Any

from gllm.runtime import protocol
from gllm.runtime.limits import LIMIT_FLAGS, STATE_ENVELOPE_BYTES, ServerLimits
from gllm.runtime.protocol import ClientId, ProtocolError
from gllm.runtime.requests import OpenRequests


def over_limit(code: str, limit: str, limits: ServerLimits, what: str,
               request_id: ClientId | None = None) -> ProtocolError:
    """``what`` (the offending size, in words) followed by the limit's value, name and option."""
    value = getattr(limits, limit)
    return ProtocolError(code, f"{what}; the limit is {value} ({limit}, set with gllm serve {LIMIT_FLAGS[limit]})",
                         request_id)


def read_request(frame: bytes, limits: ServerLimits) -> protocol.Request:
    """Decode, validate and size-check one client message; raises ``ProtocolError``."""
    return read_message(frame, limits)[1]


def read_message(frame: bytes, limits: ServerLimits) -> tuple[dict[str, Any], protocol.Request]:
    """``read_request``, also returning the decoded map (whose envelope fields, such as ``affinity``, the
    request does not hold). Only a ``restore`` may be larger than ``max_message_bytes``: its saved state
    is bounded by ``max_state_bytes``."""
    if len(frame) > limits.max_message_bytes and (len(frame) > limits.max_state_bytes + STATE_ENVELOPE_BYTES
                                                  or protocol.peek_type(frame) != "restore"):
        raise over_limit("too_long", "max_message_bytes", limits, f"the message is {len(frame)} bytes")
    try:
        msg = protocol.decode(frame)
    except protocol.NestingError:
        raise over_limit("bad_request", "max_nesting_depth", limits,
                         "the message nests maps and arrays too deeply to decode") from None
    depth = protocol.nesting_depth(msg, limits.max_nesting_depth)
    if depth > limits.max_nesting_depth:
        request_id = protocol.echo_id(msg.get("id")) if isinstance(msg, dict) else None
        raise over_limit("bad_request", "max_nesting_depth", limits,
                         f"the message nests maps and arrays more than {limits.max_nesting_depth} deep", request_id)
    req = protocol.validate(msg)
    if isinstance(req, protocol.Generate):
        _check_generate(req, limits)
    elif isinstance(req, protocol.Score):
        _check_score(req, limits)
    elif isinstance(req, protocol.Restore):
        check_state(len(req.state), limits, req.id)
    return msg, req


def check_open(requests: OpenRequests, peer: bytes, request_id: ClientId, limits: ServerLimits) -> None:
    """A new request's id must not name one of the client's open requests, and the client must have room
    for one more under ``max_open_requests``."""
    if requests.find(peer, request_id) is not None:
        raise ProtocolError("bad_request", f"id {request_id!r} is already used by one of your open requests",
                            request_id)
    if requests.count(peer) >= limits.max_open_requests:
        raise over_limit("overloaded", "max_open_requests", limits,
                         f"this connection already has {requests.count(peer)} requests open "
                         "(wait for one to end, or cancel one)", request_id)


def peek_id(frame: bytes, limits: ServerLimits) -> ClientId | None:
    """The id of a message that is refused unread (nil when it cannot be read), for the error to echo."""
    try:
        msg = protocol.decode(frame) if len(frame) <= limits.max_message_bytes else None
    except ProtocolError:
        return None
    return protocol.echo_id(msg.get("id")) if isinstance(msg, dict) else None


def _check_generate(req: protocol.Generate, limits: ServerLimits) -> None:
    if req.max_tokens > limits.max_completion_tokens:
        raise over_limit("too_long", "max_completion_tokens", limits, f"max_tokens is {req.max_tokens}", req.id)
    stop = req.stop or []
    if len(stop) > limits.max_stop_strings:
        raise over_limit("bad_request", "max_stop_strings", limits, f"'stop' has {len(stop)} strings", req.id)
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_chars:
        raise over_limit("bad_request", "max_stop_chars", limits, f"a stop string has {longest} characters", req.id)
    _check_given_prompt(req, limits)


def _check_score(req: protocol.Score, limits: ServerLimits) -> None:
    if len(req.candidates) > limits.max_candidates:
        raise over_limit("bad_request", "max_candidates", limits, f"there are {len(req.candidates)} candidates",
                         req.id)
    for i, cand in enumerate(req.candidates):
        if isinstance(cand, list):
            check_candidate(i, len(cand), limits, req.id)
    _check_given_prompt(req, limits)


def _check_given_prompt(req: protocol.Generate | protocol.Score, limits: ServerLimits) -> None:
    if req.prompt_token_ids is not None:
        check_prompt(len(req.prompt_token_ids), limits, req.id)


def check_prompt(num_tokens: int, limits: ServerLimits, request_id: ClientId) -> None:
    if num_tokens > limits.max_prompt_tokens:
        raise over_limit("too_long", "max_prompt_tokens", limits, f"the prompt has {num_tokens} tokens", request_id)


def check_candidate(index: int, num_tokens: int, limits: ServerLimits, request_id: ClientId) -> None:
    if num_tokens > limits.max_candidate_tokens:
        raise over_limit("too_long", "max_candidate_tokens", limits,
                         f"candidate {index} has {num_tokens} tokens", request_id)


def check_state(num_bytes: int, limits: ServerLimits, request_id: ClientId) -> None:
    if num_bytes > limits.max_state_bytes:
        raise over_limit("too_long", "max_state_bytes", limits, f"the state is {num_bytes} bytes", request_id)


def reported(limits: ServerLimits) -> dict[str, Any]:
    """The limits an ``info`` reply lists: every one a client can run into."""
    return {**{name: getattr(limits, name) for name in LIMIT_FLAGS}, "max_logprobs": protocol.MAX_LOGPROBS}
