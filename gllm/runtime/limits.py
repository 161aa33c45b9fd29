"""What one ``gllm serve`` process accepts: sizes and counts a client controls, clients, shutdown grace.

Kept apart from the server so that ``gllm --help`` can show the defaults without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    max_message_bytes: int = 1 << 20  # larger messages get a too_long error ...
    max_open_requests: int = 64  # per client connection; beyond it: overloaded
    shutdown_grace_s: float = 5.0  # in-flight requests may finish within this after SIGTERM
    shutdown_drain_s: float = 5.0  # ... then the replies still waiting get this long to be read
    max_clients: int = 256  # connections that have spoken and are still open; a new one beyond it: overloaded
    max_nesting_depth: int = 8  # maps and arrays inside each other; deeper: bad_request
    max_prompt_tokens: int = 8192  # after tokenization (max_seq_len also applies); beyond it: too_long
    max_completion_tokens: int = 8192  # the largest max_tokens a generate may ask for; beyond it: too_long
    max_stop_strings: int = 16  # beyond it: bad_request
    max_stop_chars: int = 256  # per stop string; beyond it: bad_request
    max_candidates: int = 256  # per score request; beyond it: bad_request
    max_candidate_tokens: int = 256  # per candidate, after tokenization; beyond it: too_long
    slow_client_timeout_s: float = 30.0  # a client whose outbox takes nothing this long: slow_client
    max_outbox_bytes: int = 16 << 20  # replies waiting for one client beyond this: slow_client
    max_grammar_size: int = 500_000  # symbols in a structured-output grammar's productions; beyond it: too_long
    grammar_fuel: int = 1_000_000  # work allowed to compile a grammar's lexer (about 50 per us); beyond: too_long
    max_state_bytes: int = 256 << 20  # a saved state (snapshot reply, restore message); beyond it: too_long

    @property
    def hard_message_bytes(self) -> int:
        """... and beyond this (libzmq's MAXMSGSIZE) libzmq drops the connection, as no reply can be read first."""
        return max(4 * self.max_message_bytes, self.max_state_bytes + STATE_ENVELOPE_BYTES)


STATE_ENVELOPE_BYTES = 4096  # a restore message's fields around its state


# Each limit a client can run into, with the ``gllm serve`` option that sets it (error messages name both).
LIMIT_FLAGS = {
    "max_message_bytes": "--max-message-size",
    "max_nesting_depth": "--max-nesting-depth",
    "max_open_requests": "--max-open-requests",
    "max_clients": "--max-clients",
    "max_prompt_tokens": "--max-prompt-tokens",
    "max_completion_tokens": "--max-completion-tokens",
    "max_stop_strings": "--max-stop-strings",
    "max_stop_chars": "--max-stop-chars",
    "max_candidates": "--max-candidates",
    "max_candidate_tokens": "--max-candidate-tokens",
    "max_grammar_size": "--max-grammar-size",
    "grammar_fuel": "--grammar-fuel",
    "max_state_bytes": "--max-state-size",
}
