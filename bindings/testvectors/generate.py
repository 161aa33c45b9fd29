"""Write the protocol v1 test vectors: ``<name>.msgpack`` (the exact bytes of one message frame) and
``<name>.json`` (the same message decoded), for other languages' codecs to be checked against.

    python bindings/testvectors/generate.py          # rewrite the files next to this script
    python bindings/testvectors/generate.py --check  # exit 1 if a file is missing or differs

Replies are built with the runtime's own message builders, so the vectors are what ``gllm serve`` sends.
The runtime encodes msgpack the way msgpack-python does by default: the smallest int and str formats,
floats as float 64; a decoder must accept every msgpack format for a type, not just these. JSON has no
bytes: a msgpack bin value (a saved state) is written ``{"$bin": "<base64>"}`` in the ``.json`` files.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from gllm.runtime import protocol as p

HERE = Path(__file__).resolve().parent

USAGE = {"prompt_tokens": 31, "completion_tokens": 9, "cached_tokens": 16}
TIMING = {"queued_ms": 0.12, "ttft_ms": 48.5, "total_ms": 412.25}

# A few bytes standing in for a saved state (a real one is a safetensors file of KV blocks, see
# docs/protocol.md): the codec only has to carry them.
STATE = b"GLLM\x00\x01\x7f\x80\xfe\xff saved state"

# name -> message. "to_runtime_*" are client requests, "to_client_*" are runtime replies.
VECTORS: dict[str, dict[str, Any]] = {
    "to_runtime_generate_minimal": {"type": "generate", "id": 1, "prompt": "Hi"},
    "to_runtime_generate_chat": {
        "type": "generate", "id": "npc-7/line-3",
        "messages": [{"role": "system", "content": "You are Brom, the village blacksmith."},
                     {"role": "user", "content": "Où est la forge ? 🔨"}],
        "max_tokens": 128, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 12345678901,
        "stop": ["\n\n", "Player:"], "logprobs": 2, "priority": -1, "ignore_eos": False, "thinking": False,
    },
    "to_runtime_generate_token_ids": {"type": "generate", "id": 4294967296, "prompt_token_ids": [1, 127, 128, 255,
                                      256, 49151], "max_tokens": 16, "temperature": 0, "ignore_eos": True},
    "to_runtime_score_strings": {"type": "score", "id": "move-42", "prompt": "1. e4 e5 2.",
                                 "candidates": [" Nf3", " Bc4", " d4"]},
    "to_runtime_score_token_ids": {"type": "score", "id": 9, "prompt_token_ids": [1, 2, 3],
                                   "candidates": [[4], [5, 6]], "priority": 2},
    "to_runtime_generate_affinity": {"type": "generate", "id": 12, "affinity": "npc-7",
                                     "messages": [{"role": "user", "content": "Good morning!"}]},
    # Structured output: at most one of json_schema, grammar, regex, choices; or tools.
    "to_runtime_generate_json_schema": {
        "type": "generate", "id": "npc-7/line-4", "messages": [{"role": "user", "content": "Hello!"}],
        "json_schema": {"type": "object", "required": ["say", "mood"], "properties": {
            "say": {"type": "string", "maxLength": 120}, "mood": {"enum": ["happy", "angry"]},
            "action": {"type": "object", "properties": {"type": {"enum": ["none", "give"]}}}}},
    },
    "to_runtime_generate_grammar": {"type": "generate", "id": 5, "prompt": "Move:",
                                    "grammar": 'root ::= [a-h] [1-8] "\U0001F600"?', "grammar_syntax": "gbnf"},
    "to_runtime_generate_choices": {"type": "generate", "id": 6, "prompt": "Open the gate?",
                                    "choices": ["yes", "no", "not yet"], "temperature": 0},
    "to_runtime_generate_tools": {
        "type": "generate", "id": "shop-1", "messages": [{"role": "user", "content": "A rope, please."}],
        "tools": [{"name": "sell", "description": "Sell an item for silver.",
                   "parameters": {"type": "object", "properties": {"item": {"type": "string"},
                                                                   "price": {"type": "integer"}}}},
                  {"name": "refuse", "parameters": '{"type": "object"}'}],
        "tool_choice": "auto",
    },
    "to_runtime_generate_adapter": {"type": "generate", "id": "npc-9/line-1", "prompt": "Halt!", "adapter": "guard"},
    "to_runtime_score_adapter": {"type": "score", "id": 10, "prompt": "1. e4", "candidates": [" e5", " c5"],
                                 "adapter": "chess"},
    "to_runtime_snapshot_adapter": {"type": "snapshot", "id": "guard/save-1", "prompt": "Halt! Who goes there?",
                                    "adapter": "guard"},
    "to_runtime_load_adapter": {"type": "load_adapter", "id": 11, "name": "guard", "path": "/srv/game/lora/guard"},
    "to_runtime_unload_adapter": {"type": "unload_adapter", "id": 12, "name": "guard"},
    "to_runtime_cancel": {"type": "cancel", "id": "npc-7/line-3"},
    "to_runtime_info": {"type": "info", "id": 2},
    "to_runtime_ping": {"type": "ping"},
    "to_client_token": p.token_message(1, 0, 19556, "Hello", -0.6931471805599453, 1),
    "to_client_token_partial_char": p.token_message(1, 5, 9221, "", -2.5, 3),
    "to_client_token_top": p.token_message("npc-7/line-3", 2, 1128, " forge", -0.105, 1,
                                           [[1128, " forge", -0.105], [47481, " é", -2.75]]),
    "to_client_done": p.done_message(1, "stop", "Hello there! How can I help?", USAGE, TIMING),
    "to_client_done_cancelled": p.done_message("npc-7/line-3", "cancelled", "La forge est",
                                               {"prompt_tokens": 40, "completion_tokens": 3, "cached_tokens": 0},
                                               {"queued_ms": 0.1, "ttft_ms": None, "total_ms": 30.5}),
    "to_client_done_tool_calls": p.done_message(
        "shop-1", "stop", '<tool_call>\n{"name": "sell", "arguments": {"item": "rope", "price": 3}}\n</tool_call>',
        USAGE, TIMING, [{"name": "sell", "arguments": {"item": "rope", "price": 3}}], True),
    "to_client_done_structure_incomplete": p.done_message("npc-7/line-4", "length", '{"say": "Welcome to', USAGE,
                                                          TIMING, structure_complete=False),
    "to_client_scores": p.scores_message(
        "move-42",
        [{"text": " Nf3", "token_ids": [465, 86, 35], "logprob": -3.25, "token_logprobs": [-2.0, -1.0, -0.25]},
         {"text": " Bc4", "token_ids": [378, 66, 36], "logprob": -6.5, "token_logprobs": [-4.0, -2.0, -0.5]}],
        {"prompt_tokens": 9, "completion_tokens": 0, "cached_tokens": 0},
        {"queued_ms": 0.2, "ttft_ms": None, "total_ms": 61.0}),
    "to_client_error": p.error_message("bad_request", "unknown field(s) for a 'generate' message: 'max_token'", 1),
    "to_client_error_no_id": p.error_message("bad_request", "the message is not valid msgpack"),
    "to_client_info": p.info_message(2, "smollm2-135m-instruct", 49152, 2048,
                                     {**dict.fromkeys(p.INFO_STATS, 0), "kv_blocks_total": 1024},
                                     {"max_message_bytes": 1048576, "max_open_requests": 64, "max_logprobs": 20,
                                      "max_candidates": 256, "max_stop_strings": 16}, ["chess", "guard"]),
    "to_client_adapters": p.adapters_message(11, ["chess", "guard"]),
    "to_client_error_forbidden": p.error_message("forbidden", "this runtime serves an unauthenticated network "
                                                 "address (--insecure), so clients may not make it read files", 11),
    "to_client_pong": p.pong_message(None),
    # From a cluster's front end (gllm serve --replicas): the same messages with a field or two more.
    "to_client_done_cluster": {**p.done_message(12, "length", "Morning to you.", USAGE, TIMING),
                               "replica": "k3x9q2ab"},
    "to_client_info_cluster": {
        **p.info_message(2, "smollm2-135m-instruct", 49152, 2048,
                         {**dict.fromkeys(p.INFO_STATS, 0), "kv_blocks_total": 2048, "replicas_healthy": 1,
                          "failovers": 1},
                         {"max_message_bytes": 1048576, "max_open_requests": 64, "max_logprobs": 20}),
        "replicas": [{"id": "k3x9q2ab", "healthy": True, "open_requests": 3, "running": 3, "waiting": 0,
                      "kv_blocks_total": 1024, "kv_blocks_in_use": 40, "kv_blocks_cached": 12},
                     {"id": "p0w7e1zz", "healthy": False, "open_requests": 0}]},
    # game state: saved conversations, events mid-line, long chats, pacing, exact replay
    "to_runtime_generate_game": {
        "type": "generate", "id": "npc-7/line-4",
        "messages": [{"role": "system", "content": "You are Brom."}, {"role": "user", "content": "Any news?"}],
        "context_overflow": "drop_oldest", "max_tokens_per_second": 5.0, "deadline_ms": 300, "seed": 7,
        "temperature": 0.7, "deterministic": True,
    },
    "to_runtime_snapshot": {"type": "snapshot", "id": "brom", "messages": [
        {"role": "system", "content": "You are Brom, the village blacksmith."}]},
    "to_runtime_restore": {"type": "restore", "id": "brom", "state": STATE, "pin": True},
    "to_runtime_release": {"type": "release", "id": "brom"},
    "to_runtime_inject": {"type": "inject", "id": "npc-7/line-4", "text": " *An arrow hits the door.*"},
    "to_client_snapshot": p.snapshot_message("brom", STATE, 32),
    "to_client_restored": p.restored_message("brom", 32, True),
    "to_client_token_injected": p.token_message("npc-7/line-4", 6, 28, "!", -1.5, 2, injected=9),
    "to_client_done_game": p.done_message("npc-7/line-4", "stop", "Hello again. Watch out!",
                                          {**USAGE, "dropped_turns": 12, "injected_tokens": 9}, TIMING),
}


def _bin(value: Any) -> dict[str, str]:
    if not isinstance(value, bytes):
        raise TypeError(f"no JSON form for {type(value).__name__}")
    return {"$bin": base64.b64encode(value).decode()}


def from_json(text: str) -> Any:
    """A ``.json`` file's message, with its ``{"$bin": ...}`` values as bytes again."""
    return json.loads(text, object_hook=lambda d: base64.b64decode(d["$bin"]) if set(d) == {"$bin"} else d)


def expected_files() -> dict[str, bytes]:
    files = {}
    for name, message in VECTORS.items():
        files[f"{name}.msgpack"] = p.encode(message)
        files[f"{name}.json"] = (json.dumps(message, indent=2, ensure_ascii=False, default=_bin) + "\n").encode()
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for name, data in expected_files().items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(name)
        else:
            path.write_bytes(data)
    if stale:
        print("out of date:", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
