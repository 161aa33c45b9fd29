"""The runtime's last reply to each request: what the engine finished, as a wire message.

``done`` for a generation (and for anything cancelled), ``scores`` for a score request, ``snapshot`` and
``restored`` for saved states, ``error`` for a request the engine failed. Each comes with a one-line
summary for the runtime's log.
"""

from __future__ import annotations

from typing import Any, Union

from gllm.engine import GenerationResult, RestoreResult, ScoreResult, SnapshotResult
from gllm.runtime import protocol
from gllm.runtime.requests import OpenRequest

Result = Union[GenerationResult, ScoreResult, SnapshotResult, RestoreResult]


def final_reply(req: OpenRequest, result: Result) -> tuple[dict[str, Any], str]:
    """The message that ends ``req``, and a summary of it for the log."""
    if isinstance(result, (SnapshotResult, RestoreResult)):
        return _state_reply(req, result)
    cancelled = result.finish_reason == "aborted"
    reason = "cancelled" if cancelled else result.finish_reason
    scored = isinstance(result, ScoreResult)
    usage = {"prompt_tokens": len(result.prompt_token_ids),
             "completion_tokens": 0 if scored else len(result.token_ids),
             "cached_tokens": result.num_cached_tokens}
    if req.dropped_turns is not None:
        usage["dropped_turns"] = req.dropped_turns
    if not scored and result.num_injected_tokens:
        usage["injected_tokens"] = result.num_injected_tokens
    timing = {k: result.metrics.get(k) for k in ("queued_ms", "ttft_ms", "total_ms")}
    summary = (f"{reason} prompt={usage['prompt_tokens']} cached={usage['cached_tokens']} "
               f"completion={usage['completion_tokens']} queued={timing['queued_ms']}ms ttft={timing['ttft_ms']}ms "
               f"total={timing['total_ms']}ms")
    if result.finish_reason == "error":
        msg = protocol.error_message("internal", f"the engine failed while running this request ({result.error}); "
                                                 "the runtime goes on", req.client_id)
    elif scored and not cancelled:
        candidates = [{"text": c.text, "token_ids": c.token_ids, "logprob": c.logprob,
                       "token_logprobs": c.token_logprobs} for c in result.candidates]
        msg = protocol.scores_message(req.client_id, candidates, usage, timing)
    else:
        msg = protocol.done_message(req.client_id, reason, "" if scored else result.text, usage, timing,
                                    *([] if scored else structure(result)))
    return msg, summary


def structure(result: GenerationResult) -> tuple[list[dict[str, Any]], bool | None]:
    """What a ``done`` says of a structured reply: its tool calls, and whether the structure is complete."""
    return [{"name": c.name, "arguments": c.arguments} for c in result.tool_calls], result.structure_complete


def _state_reply(req: OpenRequest, result: SnapshotResult | RestoreResult) -> tuple[dict[str, Any], str]:
    summary = f"{result.finish_reason} tokens={result.num_tokens}"
    if result.finish_reason == "aborted":
        usage = {"prompt_tokens": result.num_tokens, "completion_tokens": 0, "cached_tokens": 0}
        timing = dict.fromkeys(("queued_ms", "ttft_ms", "total_ms"))
        return protocol.done_message(req.client_id, "cancelled", "", usage, timing), summary
    if result.error is not None:
        code = "overloaded" if isinstance(result, RestoreResult) and result.pin_limit else "internal"
        return protocol.error_message(code, f"the {req.kind} failed: {result.error}", req.client_id), summary
    if isinstance(result, SnapshotResult):
        return protocol.snapshot_message(req.client_id, result.state, result.num_tokens), summary
    return protocol.restored_message(req.client_id, result.num_tokens, result.pinned), summary
