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

from gllm.engine.output import RequestOutput
from gllm.engine.params import GenerationRequest, GenerationResult, GeneratorParams, TokenDelta
from gllm.engine.scheduler import Scheduler
from gllm.engine.sequence import Sequence, Status
from gllm.engine.streaming import AsyncDriver
from gllm.kv import BlockManager, allocate_kv_cache, bytes_per_block
from gllm.loader import LoadedModel, load_model
from gllm.loader.registry import DEFAULT_MODEL
from gllm.model import LlamaModel
from gllm.runner import BatchChunk, ModelRunner
from gllm.sample import Sampler, SamplingRow

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    deltas: list[TokenDelta] = field(default_factory=list)
    finished: list[GenerationResult] = field(default_factory=list)


class LLMEngine(AsyncDriver):
    """A Llama model, its paged KV cache, a scheduler and a sampler.

    ``add_request`` / ``abort`` may be called from any thread: they queue work that the next ``step``
    picks up. ``step`` itself runs on one thread at a time (the caller's, or the asyncio driver's worker).
    """

    def __init__(
        self,
        model: str | Path | LoadedModel = DEFAULT_MODEL,
        gen_params: GeneratorParams | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.params = params = gen_params or GeneratorParams()
        self.device = torch.device(device)
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype)
        self.model_name, self.config, self.tokenizer = loaded.name, loaded.config, loaded.tokenizer
        cfg = self.config
        self.max_seq_len = min(params.max_seq_len, cfg.max_position_embeddings)
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | (
            self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        )
        with torch.device(self.device):
            net = LlamaModel(cfg, self.max_seq_len).to(dtype)
        net.load_weights(loaded.weights)
        self.model = net.eval()
        num_blocks = self._num_kv_blocks(dtype)
        self.block_manager = BlockManager(num_blocks, params.block_size, params.enable_prefix_caching)
        kv = allocate_kv_cache(cfg, num_blocks, params.block_size, dtype, self.device)
        self.runner = ModelRunner(self.model, kv, params.block_size, self.device)
        self.scheduler = Scheduler(self.block_manager, params.max_batch_size, params.token_budget)
        self.sampler = Sampler(params.seed)
        self._inbox: collections.deque[tuple[Sequence, RequestOutput]] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._live: dict[str, RequestOutput] = {}
        self._arrivals = itertools.count()
        self._counters = collections.Counter()

    def _num_kv_blocks(self, dtype: torch.dtype) -> int:
        p = self.params
        if p.num_kv_blocks is not None:
            return p.num_kv_blocks
        if p.kv_memory is not None:
            return max(1, p.kv_memory // bytes_per_block(self.config, p.block_size, dtype))
        return p.max_batch_size * -(-self.max_seq_len // p.block_size)

    # ----------------------------------------------------------------- requests
    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """Token ids of a request's prompt (text tokenized, or chat template applied)."""
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary (0..{self.config.vocab_size - 1}): {bad[:5]}")
        elif self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer: pass prompt_token_ids")
        elif req.messages is not None:
            if not req.messages:
                raise ValueError("messages is empty")
            ids = self.tokenizer.apply_chat_template(req.messages)
        else:
            ids = self.tokenizer.encode(req.prompt) if req.prompt else []
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len}, which leaves no room for new tokens"
            )
        return ids

    def add_request(self, req: GenerationRequest) -> str:
        """Validate and queue a request; returns its id. Raises ``ValueError`` for bad input."""
        req.validate()
        ids = self.prompt_ids(req)
        max_tokens = min(len(ids) + req.max_new_tokens, self.max_seq_len)
        if self.block_manager.blocks_needed(max_tokens) > self.block_manager.pool.num_blocks:
            raise ValueError(
                f"the KV cache ({self.block_manager.pool.num_blocks} blocks) cannot hold {max_tokens} tokens; "
                "give the engine more KV blocks or ask for fewer tokens"
            )
        request_id = req.request_id or f"req-{next(self._arrivals)}"
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = None
        if req.seed is not None:
            generator = torch.Generator(self.device).manual_seed(req.seed)
        eos = frozenset(req.stop_token_ids or ()) | (frozenset() if req.ignore_eos else self.eos_token_ids)
        seq = Sequence(
            request_id=request_id,
            token_ids=ids,
            num_prompt_tokens=len(ids),
            max_tokens=max_tokens,
            sampling=SamplingRow(req.temperature, req.top_k, req.top_p, req.logprobs, generator),
            priority=req.priority,
            arrival=next(self._arrivals),
            eos_token_ids=eos,
        )
        output = RequestOutput(seq, self.tokenizer, req.stop)
        self._live[request_id] = output
        self._inbox.append((seq, output))
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; unknown or finished ids are ignored (aborts are idempotent)."""
        self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

    # --------------------------------------------------------------------- step
    def step(self) -> StepOutput:
        """Schedule, run the model, sample, and post-process one batch."""
        out = StepOutput()
        self._take_new_work(out)
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return out
        now = time.perf_counter()
        for c in plan.chunks:
            c.seq.scheduled_time = c.seq.scheduled_time or now
        chunks = [
            BatchChunk(c.seq.token_ids[c.start : c.start + c.num_tokens], c.start, c.seq.block_table, c.samples)
            for c in plan.chunks
        ]
        logits = self.runner.execute(chunks)
        sampling_seqs = [c.seq for c in plan.chunks if c.samples]
        sampled = self.sampler(logits, [s.sampling for s in sampling_seqs])
        events = self.scheduler.update(plan, dict(zip(sampling_seqs, sampled.token_ids)))
        row = {seq: i for i, seq in enumerate(sampling_seqs)}
        for seq, token, reason in events:
            i = row[seq]
            output = self._live[seq.request_id]
            delta, final = output.add_token(
                token, sampled.logprobs[i], sampled.ranks[i], sampled.top_logprobs[i], reason
            )
            if final is not None and reason is None:
                self.scheduler.finish(seq, final)
            out.deltas.append(delta)
            if final is not None:
                out.finished.append(self._close(output, final))
        self._counters["steps"] += 1
        self._counters["generated_tokens"] += len(events)
        return out

    def _take_new_work(self, out: StepOutput) -> None:
        while self._inbox:
            seq, _ = self._inbox.popleft()
            if seq.status is not Status.FINISHED:
                self.scheduler.add(seq)
        while self._aborts:
            output = self._live.get(self._aborts.popleft())
            if output is not None:
                self.scheduler.finish(output.seq, "aborted")
                out.finished.append(self._close(output, "aborted"))

    def _close(self, output: RequestOutput, reason: str) -> GenerationResult:
        del self._live[output.seq.request_id]
        result = output.finish(reason)
        self._counters["finished_requests"] += 1
        self._counters["prompt_tokens"] += output.seq.num_prompt_tokens
        self._counters["cached_prompt_tokens"] += output.seq.num_cached_tokens
        m = result.metrics
        log.debug("%s %s prompt=%d new=%d cached=%d ttft=%sms total=%sms", result.request_id, reason,
                  len(result.prompt_token_ids), len(result.token_ids), result.num_cached_tokens, m["ttft_ms"], m["total_ms"])
        return result

    # ------------------------------------------------------------- conveniences
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion on this thread; results in input order."""
        ids = [self.add_request(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(ids):
            for r in self.step().finished:
                results[r.request_id] = r
        return [results[i] for i in ids]

    def stats(self) -> dict[str, Any]:
        pool = self.block_manager.pool
        return {
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_in_use": pool.num_in_use,
            "kv_blocks_cached": pool.num_cached,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "preemptions": self.scheduler.num_preemptions,
            "cache_evictions": pool.cache_evictions,
            **self._counters,
        }
