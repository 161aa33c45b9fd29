"""LLMEngine: requests in, one scheduled model step at a time, tokens and results out."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gllm.constrain import GrammarLimits, PendingMasks
from gllm.engine.constrained import Constraints
from gllm.engine.game_state import GameState
from gllm.engine.jobs import GenerationJob, ScoreJob
from gllm.engine.params import GenerationRequest, GenerationResult, GeneratorParams, TokenDelta
from gllm.engine.prompts import Prompts, resolve_dtype
from gllm.engine.saved_states import SnapshotJob
from gllm.engine.scheduler import SchedulePlan, Scheduler
from gllm.engine.scoring import ScoreRequest, ScoreResult
from gllm.engine.sequence import Sequence, Status
from gllm.engine.streaming import AsyncDriver
from gllm.kv import BlockManager, allocate_kv_cache, bytes_per_block
from gllm.loader import LoadedModel, is_gguf, load_model
from gllm.loader.registry import DEFAULT_MODEL
from gllm.lora import AdapterRegistry, LoraAdapter
from gllm.model import LlamaModel
from gllm.ops import block_linear
from gllm.ops.backend import select_backend
from gllm.ops.linear import packing_supported
from gllm.runner import BatchChunk, ModelRunner
from gllm.sample import Sampler, SamplingRow
from gllm.sample.sampler import PendingSample

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A step queued on the device: its plan, the sequences it samples (row order) and their samples."""

    plan: SchedulePlan
    seqs: list[Sequence]
    sample: PendingSample | None


@dataclass
class StepOutput:
    deltas: list[TokenDelta] = field(default_factory=list)
    finished: list[GenerationResult] = field(default_factory=list)


class LLMEngine(AsyncDriver, GameState, Prompts):
    """A Llama model, its paged KV cache, a scheduler and a sampler.

    ``add_request`` / ``abort`` may be called from any thread: they queue work that the next ``step``
    picks up. ``step`` itself runs on one thread at a time (the caller's, or the asyncio driver's worker).
    """

    def __init__(
        self,
        model: str | Path | LoadedModel = DEFAULT_MODEL,
        gen_params: GeneratorParams | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "auto",
        attention: str = "auto",
        cuda_graphs: bool = True,
        quantize: str | None = None,
        overlap: bool | None = None,
        grammar_limits: GrammarLimits = GrammarLimits(),
        adapters: dict[str, str | Path] | None = None,
    ):
        """``dtype="auto"`` picks the fastest precision that keeps quality (``resolve_dtype``). On the CPU
        a GGUF model's matrices stay in the file's blocks (Q4_0 ... Q8_0, Q4_K, Q5_K, Q6_K) and every
        product multiplies from them (``gllm.ops.block_linear``, activations rounded to int8).
        ``torch.float32`` asked for by name is exact against the reference: dense weights, dequantized
        (a ``LoadedModel`` loaded with ``blocks=True`` still multiplies from its blocks, in float32).
        ``quantize="int8"`` (CPU, bfloat16) instead stores weight-only int8 copies of dequantized weights
        (``gllm.ops.linear``). ``grammar_limits`` bound the work one request's structured-output grammar
        may ask for. ``adapters``: LoRA adapters to load at start, ``{name: path}`` (see ``load_adapter``)."""
        super().__init__()
        self.params = params = gen_params or GeneratorParams()
        self.device = torch.device(device)
        blocks = self.device.type == "cpu" and quantize is None and block_linear.available()
        self.dtype = dtype = resolve_dtype(dtype, self.device, blocks and is_gguf(model))
        blocks = blocks and (dtype != torch.float32 or isinstance(model, LoadedModel))
        packed = packing_supported(dtype, self.device)
        if quantize is not None and not packed:
            raise ValueError(f"quantize={quantize!r} needs dtype bfloat16 on a CPU with bfloat16 support "
                             f"(got {dtype} on {self.device})")
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, blocks=blocks)
        self.model_name, self.config, self.tokenizer = loaded.name, loaded.config, loaded.tokenizer
        cfg = self.config
        self.max_seq_len = min(params.max_seq_len, cfg.max_position_embeddings)
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | (
            self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        )
        self.attention = select_backend(attention, self.device)
        net = LlamaModel.empty(cfg, self.max_seq_len, self.attention, dtype, self.device, loaded.blocks if blocks else None)
        net.load_weights(loaded.weights, loaded.blocks)
        if packed:
            net.pack_weights(quantize)
        self.quantize = quantize
        self.model = net.eval()
        num_blocks = self._num_kv_blocks(dtype)
        # A model whose every layer is local needs no block behind the window: those are released as it passes.
        window = cfg.sliding_window if cfg.all_local else None
        self.block_manager = BlockManager(num_blocks, params.block_size, params.enable_prefix_caching, window)
        # One block more than the pool hands out: the scratch block that CUDA graphs' padding rows write to.
        kv = allocate_kv_cache(cfg, num_blocks + 1, params.block_size, dtype, self.device)
        self.runner = ModelRunner(self.model, kv, params.block_size, self.device)
        self.adapters = self.runner.adapters = AdapterRegistry(self.model, cfg, dtype, self.device,
                                                               triton=self.attention.name == "triton")
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)
        if cuda_graphs and self.device.type == "cuda":
            self.runner.capture_graphs(num_blocks, params.max_batch_size, self.max_seq_len)
        # Queue each decode step before reading the last one's tokens (``step``); it pays where the device
        # runs apart from the host, so the default is on for CUDA.
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.scheduler = Scheduler(self.block_manager, params.max_batch_size, params.token_budget)
        self.sampler = Sampler(params.seed)
        self.constraints = Constraints(self.tokenizer, cfg.vocab_size, self.eos_token_ids, grammar_limits)
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._jobs: dict[str, GenerationJob | ScoreJob] = {}  # by request id, until their result is out
        self._job_of: dict[Sequence, GenerationJob | ScoreJob] = {}
        self._pending: Launched | None = None  # a decode step queued ahead (see ``step``)
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._counters = collections.Counter()
        self._init_game_state(loaded.weights, quantize, loaded.blocks if blocks else {})

    def _num_kv_blocks(self, dtype: torch.dtype) -> int:
        p = self.params
        if p.num_kv_blocks is not None:
            return p.num_kv_blocks
        if p.kv_memory is not None:
            return max(1, p.kv_memory // bytes_per_block(self.config, p.block_size, dtype))
        return p.max_batch_size * -(-self.max_seq_len // p.block_size)

    # ----------------------------------------------------------------- requests
    def _new_request_id(self, given: str | None) -> str:
        request_id = given or f"req-{next(self._ids)}"
        if request_id in self._jobs:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def load_adapter(self, name: str, path: str | Path) -> LoraAdapter:
        """Load a LoRA adapter (a PEFT folder or a GGUF LoRA file) that requests can then name. A file
        that does not fit the model raises ``gllm.lora.AdapterError`` (a ``ValueError``), changing nothing."""
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter: new requests can no longer name it; running ones finish with it."""
        self.adapters.unload(name)

    def _adapter(self, name: str | None) -> LoraAdapter | None:
        return None if name is None else self.adapters.get(name)

    def add_request(self, req: GenerationRequest) -> str:
        """Validate and queue a request; returns its id. Raises ``ValueError`` for bad input."""
        req.validate()
        adapter = self._adapter(req.adapter)
        ids, dropped_turns = self.fitted_prompt(req)
        resumed = self._check_ids([t for t, _, _ in req.resume], "resume") if req.resume else []
        injected = [(i, self._check_ids(t, "resume_injected")) for i, t in req.resume_injected or ()]
        timing = self._sequence_timing(req)
        # Injected tokens do not count against max_new_tokens (as for ``inject``).
        max_tokens = min(len(ids) + req.max_new_tokens + sum(len(t) for _, t in injected), self.max_seq_len)
        self._check_room(max_tokens)
        grammar = self.constraints.compile(req)  # None without one; refused here when it does not compile
        request_id = self._new_request_id(req.request_id)
        eos = frozenset(req.stop_token_ids or ()) | (frozenset() if req.ignore_eos else self.eos_token_ids)
        seqs = []
        for i in range(req.n):
            generator = None if req.seed is None else torch.Generator(self.device).manual_seed(req.seed + i)
            if generator is not None and req.temperature > 0:
                for _ in resumed:  # the one draw the sampler made for each of them
                    torch.rand(1, device=self.device, generator=generator)
            seqs.append(Sequence(
                request_id=request_id if i == 0 else f"{request_id}#{i}",
                token_ids=ids + _interleave(resumed, injected),
                num_prompt_tokens=len(ids),
                max_tokens=max_tokens,
                sampling=SamplingRow(req.temperature, req.top_k, req.top_p, req.logprobs, generator),
                priority=req.priority,
                arrival=next(self._arrivals),
                eos_token_ids=eos,
                fork_index=i,
                logits_from=0 if req.prompt_logprobs else None,
                constraint=None if grammar is None else self.constraints.compiler.constraint(grammar),
                adapter=adapter,
                **timing,
            ))
        seqs[0].pending_forks = seqs[1:]
        job = GenerationJob(seqs, self.tokenizer, req.stop, req.prompt_logprobs, dropped_turns)
        if req.resume:
            if seqs[0].constraint is not None and not seqs[0].constraint.replay(resumed):
                raise ValueError("the resumed tokens do not follow the request's grammar")
            # Tokens handed out already; a stream whose end was lost on the way ends at once.
            seqs[0].finish_reason = job.replay(seqs[0], req.resume, injected)
        self._submit(job)
        return request_id

    def add_score(self, req: ScoreRequest) -> str:
        """Validate and queue a score request; returns its id. See ``gllm.engine.scoring`` for tokenization."""
        req.validate()
        adapter = self._adapter(req.adapter)
        prompt = self.prompt_ids(req)
        targets, texts = [], []
        for c in req.candidates:
            if isinstance(c, str):
                if self.tokenizer is None:
                    raise ValueError(f"model {self.model_name} has no tokenizer: give candidates as token ids")
                ids = self.tokenizer.encode(c, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"candidate {c!r} has no tokens")
            else:
                ids = self._check_ids(c, "candidate")
            targets.append(ids)
            texts.append(c if isinstance(c, str) else (self.tokenizer.decode(ids) if self.tokenizer else ""))
        longest = len(prompt) + max(map(len, targets))
        if longest > self.max_seq_len:
            raise ValueError(f"prompt plus the longest candidate is {longest} tokens; max_seq_len is {self.max_seq_len}")
        self._check_room(longest)
        request_id = self._new_request_id(req.request_id)
        common = dict(num_prompt_tokens=len(prompt), max_tokens=longest, sampling=SamplingRow(0.0),
                      priority=req.priority, samples=False, adapter=adapter)
        parent = Sequence(request_id=request_id, token_ids=list(prompt), arrival=next(self._arrivals), **common)
        cands = [
            Sequence(request_id=f"{request_id}#{i}", token_ids=prompt + t[:-1], arrival=next(self._arrivals),
                     fork_index=i, logits_from=len(prompt), **common)
            for i, t in enumerate(targets)
        ]
        parent.pending_forks = cands
        self._submit(ScoreJob(parent, cands, targets, texts))
        return request_id

    def _submit(self, job: GenerationJob | ScoreJob | SnapshotJob) -> None:
        self._jobs[job.request_id] = job
        for seq in job.seqs:
            self._job_of[seq] = job
        self._inbox.append(job.seqs[0])

    def abort(self, request_id: str) -> None:
        """Cancel a request; unknown or finished ids are ignored (aborts are idempotent)."""
        self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self._pending or self.scheduler.has_work() or self._game_state_work())

    # --------------------------------------------------------------------- step
    def step(self) -> StepOutput:
        """Schedule, run the model, sample, and post-process one batch.

        With ``overlap`` on, a batch of plain decodes queues the next decode step for the same sequences
        (its input tokens are this step's samples, still on the device) before the host reads this step's
        tokens; the host's bookkeeping then runs while the device computes. A sequence that stops here
        computes one extra token there, which is dropped. The returned deltas are always this step's.

        A fault while running the batch stays with it: its requests finish with reason ``error`` (the
        result's ``error`` says why), their blocks are freed, and every other request goes on.
        """
        out = StepOutput()
        self._take_new_work()
        self._apply_state_work(out)  # restores and releases of saved states, injections
        launched, self._pending = self._pending, None
        if launched is None:
            launched = self._launch(self.scheduler.schedule())
        if launched is not None:
            ahead = self.scheduler.plan_ahead(launched.plan) if self.overlap and not self._injections else None
            if ahead is not None:
                self._pending = self._launch(ahead, launched.sample.token_ids)
                self._counters["steps_ahead"] += 1
            self._apply(launched, out)
        self._apply_injections()  # those that waited for a step queued ahead
        self._collect_finished(out)
        return out

    def _launch(self, plan: SchedulePlan, input_ids: torch.Tensor | None = None) -> Launched | None:
        """Queue a plan's model step and sampling on the device; prompt logprobs are recorded here."""
        if not plan.chunks:
            return None
        now = time.perf_counter()
        for c in plan.chunks:
            c.seq.scheduled_time = c.seq.scheduled_time or now
        chunks = [
            BatchChunk(c.seq.token_ids[c.start : c.start + c.num_tokens] or [0], c.start, c.seq.block_table, c.num_logits,
                       c.seq.exact, c.seq.adapter)
            for c in plan.chunks
        ]
        self._counters["steps"] += 1
        self._counters["computed_tokens"] += plan.num_tokens
        self._counters["block_copies"] += len(plan.copies)
        try:
            masks = self.constraints.start_masks(plan)  # computed while the model runs
            logits = self.runner.execute(chunks, plan.copies, input_ids)
            return Launched(plan, *self._sample(plan, logits, masks))
        except Exception as exc:
            self._fail_batch(plan, exc)
            return None

    def _apply(self, launched: Launched, out: StepOutput) -> None:
        """Wait for a launched step's samples and hand its tokens to the scheduler and the requests."""
        plan = launched.plan
        try:
            sampled, info = {}, {}
            if launched.sample is not None:
                r = launched.sample.result()
                sampled = dict(zip(launched.seqs, r.token_ids))
                info = dict(zip(launched.seqs, zip(r.logprobs, r.ranks, r.top_logprobs)))
            for seq in dict.fromkeys(c.seq for c in plan.chunks if c.seq.constraint is not None):
                out.deltas += self._job_of[seq].forced_deltas(seq, self.scheduler.finish)  # before the samples
            events = self.scheduler.update(plan, sampled)
            for seq, token, reason in events:
                job = self._job_of[seq]
                delta, final = job.on_token(seq, token, *info[seq], reason)
                if final is None and seq.constraint is not None:
                    final = self.constraints.after_sample(seq, token, job, delta)
                if final is not None and reason is None:
                    self.scheduler.finish(seq, final)  # a stop string, a complete structure, a failed grammar
                out.deltas.append(delta)
            self._counters["generated_tokens"] += len(events)
        except Exception as exc:
            self._fail_batch(plan, exc)

    def _fail_batch(self, plan: SchedulePlan, exc: Exception) -> None:
        """End every request with a sequence in the failed batch (all its sequences: forks, candidates)."""
        reason = f"{type(exc).__name__}: {exc}"[:200]
        jobs = {self._job_of[c.seq] for c in plan.chunks if c.seq in self._job_of}
        log.error("a batch of %d request(s) failed; ending them: %s", len(jobs), reason, exc_info=exc)
        self._fail_jobs(jobs, reason)
        self._counters["failed_batches"] += 1

    def _fail_jobs(self, jobs: set[GenerationJob | ScoreJob], reason: str) -> None:
        for job in jobs:
            job.error = reason
            for seq in job.seqs:
                self.scheduler.finish(seq, "error")

    def _sample(self, plan: SchedulePlan, logits: torch.Tensor,
                masks: PendingMasks | None) -> tuple[list[Sequence], PendingSample | None]:
        """Record logprobs of given tokens, then queue sampling for every sequence (and new fork) that
        needs a token, within its grammar's mask. Returns the sampled sequences in row order and their
        pending sample."""
        seqs, rows = [], []
        row = 0
        for c in plan.chunks:
            k = c.num_logits
            seq = c.seq
            if k and (seq.logits_from is not None or not seq.samples):
                first = c.start + c.num_tokens - k
                self._job_of[seq].record_logprobs(seq, first, logits[row : row + k].log_softmax(-1))
            if c.samples:
                for s in (seq, *seq.pending_forks):
                    seqs.append(s)
                    rows.append(row + k - 1)
            row += k
        if not seqs:
            return [], None
        allowed, failed = masks.result() if masks is not None else (None, [])
        self._fail_jobs({self._job_of[seqs[i]] for i in failed}, "the grammar failed")
        sample_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
        return seqs, self.sampler.launch(sample_logits, [s.sampling for s in seqs], allowed)

    def _take_new_work(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            if seq.status is not Status.FINISHED:
                self.scheduler.add(seq)
                if seq.finish_reason is not None:  # a resumed stream that had ended
                    self.scheduler.finish(seq, seq.finish_reason)
        while self._aborts:
            job = self._jobs.get(self._aborts.popleft())
            for seq in job.seqs if job else ():
                self.scheduler.finish(seq, "aborted")

    def _collect_finished(self, out: StepOutput) -> None:
        for seq in self.scheduler.drain_finished():
            job = self._job_of.pop(seq)
            if job.done and self._jobs.pop(job.request_id, None) is not None:
                result = job.result()
                out.finished.append(result)
                self._counters["finished_requests"] += 1
                self._counters["prompt_tokens"] += len(result.prompt_token_ids)
                self._counters["cached_prompt_tokens"] += result.num_cached_tokens
                log.debug("%s %s prompt=%d cached=%d %s", result.request_id, result.finish_reason,
                          len(result.prompt_token_ids), result.num_cached_tokens, result.metrics)

    # ------------------------------------------------------------- conveniences
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion on this thread; results in input order."""
        return self._run([self.add_request(r) for r in requests])

    def score(self, req: ScoreRequest) -> ScoreResult:
        """Score candidates synchronously (see ``enqueue_score`` for the async form)."""
        return self._run([self.add_score(req)])[0]

    def _run(self, ids: list[str]) -> list:
        results: dict[str, Any] = {}
        while any(i not in results for i in ids):
            for r in self.step().finished:
                results[r.request_id] = r
            if (wait := self.wait_time()) > 0:  # paced requests not due yet: no busy loop
                time.sleep(min(wait, 0.01))
        return [results[i] for i in ids]

    def stats(self) -> dict[str, Any]:
        pool = self.block_manager.pool
        return {
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_in_use": pool.num_in_use,
            "kv_blocks_cached": pool.num_cached,
            "prefix_caching": self.block_manager.enable_prefix_caching,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "preemptions": self.scheduler.num_preemptions,
            "cache_evictions": pool.cache_evictions,
            "forced_tokens": self.constraints.forced_tokens,
            **self.game_state_stats(),
            **self._counters,
        }


def _interleave(resumed: list[int], injected: list[tuple[int, list[int]]]) -> list[int]:
    """The resumed tokens with each injection put back before the token it came before."""
    out, pending = [], list(injected)
    for i, token in enumerate(resumed + [None]):
        while pending and pending[0][0] == i:
            out += pending.pop(0)[1]
        if token is not None:
            out.append(token)
    return out
