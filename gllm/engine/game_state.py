"""What a game needs beyond a chat server: saved conversations, long chats, events mid-line, pacing.

Mixed into ``LLMEngine``. Like ``add_request`` and ``abort``, these calls check their input at once
(``ValueError``, nothing changed) and queue the work; the engine's step applies it between two model steps,
where no block is being written:

* ``snapshot``: the KV of a prompt's full blocks, with their token ids and the model's fingerprint, as bytes
  (``gllm.engine.snapshot``); ``restore`` puts them back into the prefix cache, optionally pinned until
  ``release``. A snapshot under a LoRA adapter records it (name and fingerprint); its restore needs the
  same adapter loaded, and its blocks then serve that adapter's requests only.
* ``context_overflow="drop_oldest"`` on a chat request: the oldest turns after the system messages are left
  out until the chat fits ``max_seq_len`` minus the tokens asked for (``fit_chat``).
* ``inject``: tokens appended to a running generation's context at its current position; the next token
  after them says how many there were (``TokenDelta.injected``).
* ``max_tokens_per_second`` and ``deadline_ms`` become the sequence's pacing and deadline (``Scheduler``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import torch

from gllm.engine.jobs import GenerationJob
from gllm.engine.params import GenerationRequest
from gllm.engine.saved_states import RestoreResult, SavedStates, SnapshotJob, SnapshotRequest
from gllm.engine.sequence import Sequence, Status
from gllm.engine.snapshot import SavedState, StateFormat, model_fingerprint
from gllm.kv import PinLimitError
from gllm.lora import LoraAdapter
from gllm.ops.block_linear import BlockWeight
from gllm.ops.invariant import probe_plan
from gllm.sample import SamplingRow


def fit_chat(encode: Callable[[list[dict[str, str]]], list[int]], messages: list[dict[str, str]],
             budget: int) -> tuple[list[int], int]:
    """The chat's token ids with the fewest oldest turns (messages) left out so that at most ``budget``
    tokens remain, and how many were left out. The leading system messages and the last message stay.
    Raises ``ValueError`` naming ``max_seq_len`` when even that is too long."""
    ids = encode(messages)
    if len(ids) <= budget:
        return ids, 0
    keep = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    droppable = max(0, len(messages) - keep - 1)
    fits: dict[int, list[int]] = {}

    def fitted(dropped: int) -> bool:  # fewer messages, fewer tokens: a binary search finds the fewest
        ids = encode(messages[:keep] + messages[keep + dropped :])
        if len(ids) <= budget:
            fits[dropped] = ids
        return dropped in fits

    lo, hi = 1, droppable
    if droppable == 0 or not fitted(droppable):
        shortest = len(encode(messages[:keep] + messages[-1:]))
        raise ValueError(f"the chat does not fit: its system messages and last message alone are {shortest} "
                         f"tokens, and max_seq_len minus the tokens asked for leaves {budget}")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fitted(mid) else (mid + 1, hi)
    return fits[lo], lo


class GameState:
    """``LLMEngine``'s game-state calls (see the module docstring)."""

    def _init_game_state(self, weights: dict[str, torch.Tensor], quantize: str | None,
                         blocks: dict[str, BlockWeight]) -> None:
        cfg, params = self.config, self.params
        fingerprint = model_fingerprint(cfg, weights, self.dtype, params.block_size, quantize, blocks)
        fmt = StateFormat(self.model_name, fingerprint,
                          self.dtype, params.block_size, (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
                          cfg.vocab_size)
        pinned = params.max_pinned_blocks
        if pinned is None:
            pinned = (self.block_manager.pool.num_blocks // 2 if params.max_pinned_memory is None
                      else params.max_pinned_memory // fmt.bytes_for(1))
        self.states = SavedStates(self.block_manager, self.runner.kv_caches, fmt, pinned)
        self._restores: collections.deque[tuple[str, SavedState, str | None, LoraAdapter | None]] = collections.deque()
        self._releases: collections.deque[str] = collections.deque()
        self._injections: collections.deque[tuple[str, list[int]]] = collections.deque()

    # ------------------------------------------------------------------------------- saved states
    def add_snapshot(self, req: SnapshotRequest) -> str:
        """Queue the snapshot of a prompt's full blocks; the step that finishes it returns a
        ``SnapshotResult`` holding the state."""
        req.validate()
        adapter = self._adapter(req.adapter)
        if not self.block_manager.enable_prefix_caching:
            raise ValueError("snapshots are taken from the prefix cache, and this engine has it switched off")
        ids = self.prompt_ids(req)
        bs = self.block_manager.block_size
        full = len(ids) // bs * bs
        if full == 0:
            raise ValueError(f"the prompt has {len(ids)} tokens, less than one KV block ({bs}): nothing to save")
        self.states.check_size(full // bs, req.max_bytes)
        self._check_room(full)
        request_id = self._new_request_id(req.request_id)
        seq = Sequence(request_id=request_id, token_ids=ids[:full], num_prompt_tokens=full, max_tokens=full,
                       sampling=SamplingRow(0.0), priority=req.priority, arrival=next(self._arrivals), samples=False,
                       adapter=adapter)
        self._submit(SnapshotJob(seq, self.states))
        return request_id

    def snapshot(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt_token_ids: list[int] | None = None, adapter: str | None = None) -> bytes:
        """The saved state of a prompt, computed (or taken from the prefix cache) on this thread."""
        req = SnapshotRequest(prompt, messages, prompt_token_ids, adapter=adapter)
        result = self._run([self.add_snapshot(req)])[0]
        if result.state is None:
            raise RuntimeError(f"the snapshot failed: {result.error or result.finish_reason}")
        return result.state

    def add_restore(self, state: bytes, pin: str | None = None, request_id: str | None = None,
                    max_bytes: int | None = None) -> str:
        """Check a state (``ValueError`` if it is damaged, from another model, or computed under a LoRA
        adapter that is not loaded) and queue putting it into the prefix cache, pinned under the name ``pin``
        when given; the next step returns a ``RestoreResult``."""
        saved = self.states.parse(state, max_bytes)
        adapter = self._state_adapter(saved)
        if pin is not None:
            self.states.check_pin(saved, pin, adapter)
        request_id = self._new_request_id(request_id)
        self._restores.append((request_id, saved, pin, adapter))
        return request_id

    def _state_adapter(self, saved: SavedState) -> LoraAdapter | None:
        """The loaded adapter a state's K/V was computed under: the same name and the same fingerprint."""
        if saved.adapter is None:
            return None
        name = saved.adapter.name
        adapter = self.adapters.adapters.get(name)
        if adapter is None:
            raise ValueError(f"the state was computed under the LoRA adapter {name!r}, which is not loaded: "
                             "load it, then restore")
        if adapter.fingerprint != saved.adapter.fingerprint:
            raise ValueError(f"the state was computed under another LoRA adapter than the one loaded as {name!r} "
                             f"(fingerprint {saved.adapter.fingerprint}, loaded {adapter.fingerprint})")
        return adapter

    def restore(self, state: bytes, pin: str | None = None) -> int:
        """Put a saved state into the prefix cache now; returns how many tokens it restored."""
        result = self._run([self.add_restore(state, pin)])[0]
        if result.error is not None:
            raise ValueError(result.error)
        return result.num_tokens

    def release(self, pin: str) -> None:
        """Unpin a restored state (its blocks stay cached, evictable again); unknown names are ignored."""
        self._releases.append(pin)

    def _apply_state_work(self, out: Any) -> None:
        """Restores, releases and injections, between two model steps."""
        self._apply_injections()
        while self._releases:
            self.states.pins.release(self._releases.popleft())
        while self._restores:
            request_id, saved, pin, adapter = self._restores.popleft()
            try:
                tokens = self.states.restore(saved, pin, adapter)
                out.finished.append(RestoreResult(request_id, tokens, "restored", pin is not None))
            except ValueError as exc:  # the limit or the name, taken since the checks of ``add_restore``
                out.finished.append(RestoreResult(request_id, 0, "error", error=str(exc),
                                                  pin_limit=isinstance(exc, PinLimitError)))

    # ------------------------------------------------------------------------------- requests
    def fitted_prompt(self, req: GenerationRequest, max_prompt_tokens: int | None = None) -> tuple[list[int], int]:
        """The request's prompt ids and how many chat turns ``context_overflow="drop_oldest"`` left out."""
        if req.context_overflow != "drop_oldest":
            return self.prompt_ids(req), 0
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer: pass prompt_token_ids")
        budget = min(self.max_seq_len - 1, self.max_seq_len - req.max_new_tokens, max_prompt_tokens or self.max_seq_len)
        return fit_chat(lambda messages: self.chat_ids(req, messages), req.messages, budget)

    def _sequence_timing(self, req: GenerationRequest) -> dict[str, Any]:
        """Pacing, deadline and exactness of a request's sequences."""
        if req.deterministic:
            self._prepare_exact()
        deadline = time.perf_counter() + req.deadline_ms / 1000 if req.deadline_ms is not None else float("inf")
        interval = 1.0 / req.max_tokens_per_second if req.max_tokens_per_second else 0.0
        return dict(token_interval=interval, deadline=deadline, exact=req.deterministic)

    def _prepare_exact(self) -> None:
        """Choose, once, how this CPU's products stay batch-invariant (``gllm.ops.invariant.probe_plan``)."""
        if self.device.type != "cpu":
            raise ValueError("deterministic requests run on the CPU only (their batch-invariant kernels are CPU kernels)")
        if self.runner.exact_plan is None:
            plan = probe_plan(self.model.products())
            if plan is None:
                raise ValueError("this CPU's matrix products give a row different bits in different batches "
                                 "whatever the call shape: deterministic requests are not available here")
            self.runner.exact_plan = plan

    def inject(self, request_id: str, text: str | None = None, token_ids: list[int] | None = None) -> None:
        """Append text (tokenized without special tokens) or token ids to a running generation's context;
        it goes on from there. Unknown or finished ids are ignored, like ``abort``."""
        if (text is None) == (token_ids is None):
            raise ValueError("inject needs exactly one of text, token_ids")
        if text is not None:
            if self.tokenizer is None:
                raise ValueError(f"model {self.model_name} has no tokenizer: inject token_ids")
            token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = self._check_ids(token_ids, "the injection")
        if ids:
            self._injections.append((request_id, ids))

    def _apply_injections(self) -> None:
        """Queued injections, once no step is queued ahead (its input is the old context): before the
        step's plan, else right after the step queued ahead is applied."""
        while self._injections and self._pending is None:
            request_id, ids = self._injections.popleft()
            job = self._jobs.get(request_id)
            for seq in job.seqs if isinstance(job, GenerationJob) else ():
                if seq.status is Status.FINISHED:
                    continue
                if seq.inject(ids, self.max_seq_len):
                    job.outputs[seq].injected(ids)
                else:
                    self.scheduler.finish(seq, "length")  # the context is full

    def _game_state_work(self) -> bool:
        return bool(self._restores or self._releases or self._injections)

    def wait_time(self) -> float:
        """Seconds the engine may sleep before its next step has work (0: now); only pacing makes it wait."""
        if self._inbox or self._aborts or self._pending or self._game_state_work():
            return 0.0
        return self.scheduler.wait_time()

    def game_state_stats(self) -> dict[str, int]:
        pins = self.states.pins
        return {"pinned_states": len(pins), "kv_blocks_pinned": pins.num_blocks, "max_pinned_blocks": pins.max_blocks}
