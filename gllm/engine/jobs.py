"""Jobs: what the engine tracks per caller request, over the one or many sequences that serve it.

A generation with ``n`` continuations is one job of ``n`` sequences (forks of the first); a score request
is one job of a prompt sequence plus one sequence per candidate that forks from it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import torch

from gllm.engine.output import RequestOutput
from gllm.engine.params import GenerationResult, TokenDelta
from gllm.engine.scoring import CandidateScore, ScoreResult
from gllm.engine.sequence import Sequence, Status
from gllm.sample.sampler import top_ids
from gllm.tokenizer import Tokenizer


def _ms(start: float, t: float | None) -> float | None:
    return None if t is None else round((t - start) * 1000, 3)


class GenerationJob:
    def __init__(self, seqs: list[Sequence], tokenizer: Tokenizer | None, stop: list[str] | None, prompt_logprobs: bool,
                 dropped_turns: int = 0):
        self.request_id = seqs[0].request_id
        self.seqs = seqs
        self.outputs = {s: RequestOutput(s, tokenizer, stop) for s in seqs}
        self.error: str | None = None  # why a failed batch ended the request
        self.dropped_turns = dropped_turns  # chat turns left out to fit (context_overflow "drop_oldest")
        self.prompt_logprobs: list[float | None] | None = None
        if prompt_logprobs:
            self.prompt_logprobs = [None] * seqs[0].num_prompt_tokens
        # Tokens a grammar forced onto a sequence, waiting for their logprobs: (index of the first in
        # token_ids, one (logprob, rank, top) or None per token).
        self.forced: dict[Sequence, tuple[int, list[tuple | None]]] = {}

    def expect_forced(self, seq: Sequence, count: int) -> None:
        """The last ``count`` tokens of ``seq`` were forced: have the next step compute their logits
        (from the position that predicts the first of them) and report them then."""
        if not count:
            return
        first = seq.num_tokens - count
        self.forced[seq] = (first, [None] * count)
        if seq.logits_from is None:
            seq.logits_from = first - 1

    def forced_deltas(self, seq: Sequence, finish: Callable[[Sequence, str], None]) -> list[TokenDelta]:
        """Deltas of the forced tokens whose logprobs are known, in order; a stop string among them ends
        the sequence (``finish``)."""
        if seq not in self.forced or seq.status is not Status.RUNNING:
            return []
        first, infos = self.forced[seq]
        deltas = []
        while infos and infos[0] is not None:
            delta, final = self.on_token(seq, seq.token_ids[first], *infos.pop(0), None)
            deltas.append(delta)
            first += 1
            if final is not None:
                finish(seq, final)
                break
        self.forced[seq] = (first, infos)
        if not infos:
            del self.forced[seq]
            if self.prompt_logprobs is None:
                seq.logits_from = None
        return deltas

    def record_logprobs(self, seq: Sequence, first_pos: int, logprobs: torch.Tensor) -> None:
        """Logprob rows for positions ``first_pos ..``: keep those that predict prompt or forced tokens."""
        if seq in self.forced:
            self._record_forced(seq, first_pos, logprobs)
        if self.prompt_logprobs is None:
            return
        n = min(len(logprobs), seq.num_prompt_tokens - 1 - first_pos)
        if n > 0:
            targets = torch.tensor(seq.token_ids[first_pos + 1 : first_pos + 1 + n], device=logprobs.device)
            values = logprobs[torch.arange(n, device=logprobs.device), targets].tolist()
            self.prompt_logprobs[first_pos + 1 : first_pos + 1 + n] = values

    def _record_forced(self, seq: Sequence, first_pos: int, logprobs: torch.Tensor) -> None:
        first, infos = self.forced[seq]
        rows = [r for r in range(len(logprobs)) if 0 <= first_pos + r + 1 - first < len(infos)]
        if not rows:
            return
        picked = logprobs[rows]
        targets = seq.token_ids[first_pos + rows[0] + 1 : first_pos + rows[-1] + 2]
        values = picked.gather(1, torch.tensor(targets, device=picked.device)[:, None])
        ranks = ((picked > values).sum(dim=-1) + 1).tolist()
        best = top_ids(picked, min(seq.sampling.num_logprobs, picked.shape[1]))
        tops = [list(zip(ids, lps)) for ids, lps in zip(best.tolist(), picked.gather(1, best).tolist())]
        for i, r in enumerate(rows):
            infos[first_pos + r + 1 - first] = (values[i, 0].item(), ranks[i], tops[i])

    def on_token(self, seq: Sequence, token: int, logprob: float, rank: int, top, reason: str | None):
        delta, final = self.outputs[seq].add_token(token, logprob, rank, top, reason)
        delta.request_id, delta.fork = self.request_id, seq.fork_index
        return delta, final

    def replay(self, seq: Sequence, tokens: list[tuple[int, float, int]],
               injected: list[tuple[int, list[int]]] = ()) -> str | None:
        """Take (token id, logprob, rank) of tokens already in ``seq`` and handed out elsewhere, as if sampled
        here, so that text, held-back text and indexes go on from them; returns the finish reason they reach
        (a stop string, or the last one being a stop token or reaching the length). ``injected``: the
        injections among them, (index of the token they came before, ids), counted as injected here too."""
        before = collections.defaultdict(list)
        for index, ids in injected:
            before[index].append(ids)
        for i, (token, logprob, rank) in enumerate(tokens):
            for ids in before.pop(i, ()):
                self.outputs[seq].injected(ids)
            last = i == len(tokens) - 1
            end = None
            if last and token in seq.eos_token_ids:
                end = "stop"
            elif last and seq.num_tokens >= seq.max_tokens:
                end = "length"
            _, reason = self.on_token(seq, token, logprob, rank, [], end)
            if reason is not None:
                return reason
        for ids in before.pop(len(tokens), ()):  # after the last one: the next token's delta says so
            self.outputs[seq].injected(ids)
        return None

    @property
    def done(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)

    def result(self) -> GenerationResult:
        results = [self.outputs[s].finish(s.finish_reason or "aborted") for s in self.seqs]
        for seq, r in zip(self.seqs, results):
            r.request_id = self.request_id
            r.prompt_logprobs = self.prompt_logprobs
            r.forks = results if len(results) > 1 else []
            r.error = self.error
            r.num_dropped_turns = self.dropped_turns
            if seq.constraint is not None:
                r.tool_calls = seq.constraint.tool_calls(r.text)
                # Complete: every generated token is reported (injected ones are context, not output), the
                # text was not cut at a stop string, and the grammar accepts.
                generated = seq.num_tokens - seq.num_prompt_tokens - self.outputs[seq].num_injected
                whole = len(r.token_ids) == generated and not self.outputs[seq].cut
                r.structure_complete = whole and seq.constraint.accepting
        return results[0]


class ScoreJob:
    def __init__(self, prompt: Sequence, candidates: list[Sequence], targets: list[list[int]], texts: list[str]):
        self.request_id = prompt.request_id
        self.prompt = prompt
        self.seqs = [prompt, *candidates]
        self.targets = dict(zip(candidates, targets))
        self.texts = texts
        self.logprobs: dict[Sequence, list[float | None]] = {c: [None] * len(t) for c, t in self.targets.items()}
        self.error: str | None = None

    def record_logprobs(self, seq: Sequence, first_pos: int, logprobs: torch.Tensor) -> None:
        """The prompt's last row scores every candidate's first token; a candidate's own rows the rest."""
        if seq is self.prompt:
            row = logprobs[-1].tolist()
            for cand, targets in self.targets.items():
                self.logprobs[cand][0] = row[targets[0]]
            return
        targets = self.targets[seq]
        start = first_pos - self.prompt.num_prompt_tokens + 1  # index in the candidate of the first target
        idx = [(r, start + r) for r in range(len(logprobs)) if 0 < start + r < len(targets)]
        if idx:
            rows = torch.tensor([r for r, _ in idx], device=logprobs.device)
            cols = torch.tensor([targets[t] for _, t in idx], device=logprobs.device)
            for (_, t), v in zip(idx, logprobs[rows, cols].tolist()):
                self.logprobs[seq][t] = v

    def on_token(self, *args):  # scoring sequences never sample
        raise AssertionError("a scoring sequence sampled a token")

    @property
    def done(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)

    def result(self) -> ScoreResult:
        p = self.prompt
        reasons = {s.finish_reason for s in self.seqs}
        cands = []
        for (seq, targets), text in zip(self.targets.items(), self.texts):
            lps = self.logprobs[seq]
            total = float("nan") if None in lps else sum(lps)
            cands.append(CandidateScore(text, targets, total, lps))
        end = time.perf_counter()
        return ScoreResult(
            request_id=self.request_id,
            candidates=cands,
            prompt_token_ids=p.token_ids[: p.num_prompt_tokens],
            num_cached_tokens=p.num_cached_tokens,
            finish_reason="error" if "error" in reasons else "aborted" if "aborted" in reasons else "scored",
            error=self.error,
            metrics={"queued_ms": _ms(p.arrival_time, p.scheduled_time), "total_ms": _ms(p.arrival_time, end)},
        )
