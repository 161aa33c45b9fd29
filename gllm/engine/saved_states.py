"""Saved conversations: snapshots of a prompt's KV blocks out of the prefix cache, and restores back in.

A snapshot runs like a score request without candidates: a sequence that computes the prompt's full
blocks (the prefix cache serves what it already has) and samples nothing. Once it is done its blocks are
cached, and the job reads them out before anything can reuse them. A restore puts the blocks of a state
back into the prefix cache under the same hashes, so the next request whose prompt starts with those
tokens takes them instead of computing them; pinned, they stay there until released.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gllm.engine.sequence import Sequence, Status, cache_salt
from gllm.engine.snapshot import SavedState, StateAdapter, StateFormat
from gllm.kv import BlockManager, Pins, read_blocks, write_blocks
from gllm.lora import LoraAdapter


@dataclass
class SnapshotRequest:
    """The prompt whose KV to save. Give exactly one of ``prompt``, ``messages`` or ``prompt_token_ids``;
    only its full blocks are saved (the tail shorter than a block is not). Under ``adapter`` (a loaded LoRA
    adapter's name) the K/V is that adapter's, and the state records it: it restores only where the same
    adapter is loaded, into the prefix cache of that adapter's requests."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    priority: int = 0
    max_bytes: int | None = None  # refuse (ValueError) a state that would be larger
    request_id: str | None = None
    adapter: str | None = None

    def validate(self) -> None:
        given = [n for n in ("prompt", "messages", "prompt_token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError("adapter must be the name of a loaded adapter (a string)")


@dataclass
class SnapshotResult:
    request_id: str
    state: bytes | None  # the saved state; None unless finish_reason is "saved"
    num_tokens: int  # tokens the state holds (whole blocks of the prompt)
    finish_reason: str  # "saved", "aborted", or "error"
    prompt_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # of those, the tokens the prefix cache already had
    metrics: dict[str, float | None] = field(default_factory=dict)  # queued_ms, total_ms
    error: str | None = None


@dataclass
class RestoreResult:
    request_id: str
    num_tokens: int  # tokens now in the prefix cache (fewer than the state's if the cache had no room)
    finish_reason: str  # "restored", "aborted" or "error"
    pinned: bool = False
    error: str | None = None
    pin_limit: bool = False  # refused: the pin would go over the engine's limit


class SnapshotJob:
    """One snapshot in the engine: its computing sequence, and the read-out once that is done."""

    def __init__(self, seq: Sequence, states: SavedStates):
        self.request_id = seq.request_id
        self.seqs = [seq]
        self.states = states
        self.error: str | None = None

    def record_logprobs(self, seq: Sequence, first_pos: int, logprobs: torch.Tensor) -> None:
        pass  # the last position's logits are computed like any chunk's end, and not needed

    def on_token(self, *args):  # a snapshot sequence never samples
        raise AssertionError("a snapshot sequence sampled a token")

    @property
    def done(self) -> bool:
        return self.seqs[0].status is Status.FINISHED

    def result(self) -> SnapshotResult:
        seq = self.seqs[0]
        reason = {"scored": "saved", "error": "error"}.get(seq.finish_reason or "", "aborted")
        state = None
        if reason == "saved":
            try:
                state = self.states.save(seq.token_ids, seq.adapter)
            except Exception as exc:  # the blocks should be there: say so rather than fail the step
                reason, self.error = "error", f"{type(exc).__name__}: {exc}"[:200]
        end = time.perf_counter()
        ms = lambda t: None if t is None else round((t - seq.arrival_time) * 1000, 3)  # noqa: E731
        return SnapshotResult(self.request_id, state, len(seq.token_ids), reason, list(seq.token_ids),
                              seq.num_cached_tokens, {"queued_ms": ms(seq.scheduled_time), "total_ms": ms(end)},
                              self.error)


class SavedStates:
    """Reads saved blocks out of the KV cache and writes restored ones in, and keeps the pins."""

    def __init__(self, blocks: BlockManager, kv_caches: list[torch.Tensor], fmt: StateFormat, max_pinned_blocks: int):
        self.blocks = blocks
        self.kv_caches = kv_caches
        self.format = fmt
        self.pins = Pins(blocks.pool, max_pinned_blocks)

    def check_size(self, num_blocks: int, max_bytes: int | None) -> None:
        size = self.format.bytes_for(num_blocks)
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"the state of {num_blocks * self.blocks.block_size} tokens would be {size} bytes; "
                             f"the limit is {max_bytes} bytes")

    def save(self, token_ids: list[int], adapter: LoraAdapter | None = None) -> bytes:
        """The state of ``token_ids`` (whole blocks, all in the prefix cache now, computed under ``adapter``)."""
        found = self.blocks.cached_prefix(token_ids, cache_salt(False, adapter))
        if len(found) * self.blocks.block_size != len(token_ids):
            raise RuntimeError(f"only {len(found)} of the snapshot's blocks are in the prefix cache")
        recorded = None if adapter is None else StateAdapter(adapter.name, adapter.fingerprint)
        return self.format.encode(token_ids, read_blocks(self.kv_caches, found), recorded)

    def parse(self, state: bytes, max_bytes: int | None = None) -> SavedState:
        """Check a state before anything changes; ``ValueError`` (``StateError``) says what is wrong."""
        if not self.blocks.enable_prefix_caching:
            raise ValueError("restoring a state needs the prefix cache, and this engine has it switched off")
        if max_bytes is not None and len(state) > max_bytes:
            raise ValueError(f"the state is {len(state)} bytes; the limit is {max_bytes} bytes")
        return self.format.decode(state)

    def check_pin(self, saved: SavedState, pin: str, adapter: LoraAdapter | None = None) -> None:
        """Raise ``PinLimitError`` (a ``ValueError``) if pinning ``saved`` would go over the limit, and
        ``ValueError`` if the name already pins a state."""
        if pin in self.pins:
            raise ValueError(f"{pin!r} already pins a state; release it first")
        cached = self.blocks.cached_prefix(saved.token_ids, cache_salt(False, adapter))
        self.pins.check(cached, extra=len(saved.token_ids) // self.blocks.block_size - len(cached))

    def restore(self, saved: SavedState, pin: str | None = None, adapter: LoraAdapter | None = None) -> int:
        """Put a parsed state's blocks into the prefix cache (pinned under ``pin`` when given), where requests
        under ``adapter`` (the one the state records, checked by ``LLMEngine.add_restore``) find them;
        returns the tokens restored: all of them, or the blocks that found room when the cache is full of
        running requests. A pin over the limit raises ``PinLimitError`` and changes nothing."""
        if pin is not None:
            self.check_pin(saved, pin, adapter)

        def fill(indexes: list[int], blocks: list[int]) -> None:
            write_blocks(self.kv_caches, blocks, saved.kv[:, :, indexes])

        held = self.blocks.hold_prefix(saved.token_ids, fill, cache_salt(False, adapter))
        restored = len(held) * self.blocks.block_size
        if pin is not None:
            self.pins.pin(pin, held)
        else:
            self.blocks.free(held)  # they stay cached
        return restored
