"""Turn a batch of logits into next tokens and the log-probabilities clients asked for.

What a client gets (the protocol promises this):

* Logprobs are the raw log-softmax of the model's logits, before temperature, top-k and top-p: the
  sampled token's logprob, its rank and the top-n alternatives. A chess bot ranking moves gets the same
  numbers whatever sampling settings it uses. Rank = 1 + the number of tokens with a strictly larger logit.
* Each row samples with its own settings: divide by temperature, keep the top-k, keep the top-p of what is
  left (renormalised), draw. Ties at the filter boundaries follow :mod:`gllm.sample.filters`: tokens
  rank by (logit descending, index ascending), so ``top_k=1`` is greedy even under ties.
* Temperature 0 is argmax of the raw logits, ties to the lowest index, like ``torch.argmax``.
* A row with a ``TokenBitmask`` chooses among its allowed tokens only: the mask applies before
  temperature, top-k and top-p (and to the greedy argmax). Its logprobs, rank and top-n stay the raw
  model's, so a forced choice can have a rank above 1.
* A draw inverts the row's cumulative distribution: one uniform number ``u`` per row, and the token is
  the first whose cumulative probability exceeds ``u`` times the row's total. It picks token ``i`` with
  probability ``probs[i]``, and a token of probability 0 (filtered out) never. A row with its own
  generator draws exactly one number from it and nothing else does, so its tokens do not depend on
  which other rows share the batch or where it sits. Rows without one share the sampler's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gllm.ops.cpu_kernels import cpu_argmax_logsumexp
from gllm.sample.bitmask import TokenBitmask
from gllm.sample.filters import filter_logits


@dataclass(frozen=True)
class SamplingRow:
    """One request's sampling settings for its row of the batch.

    ``generator`` must live on the logits' device; give one to seeded requests so that their tokens are
    reproducible whatever else runs beside them.
    """

    temperature: float = 1.0  # 0 => greedy (argmax)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # 1.0 => off; in (0, 1]
    num_logprobs: int = 0  # how many top alternatives to return
    generator: torch.Generator | None = None  # None => the sampler's shared generator

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_logprobs < 0:
            raise ValueError(f"num_logprobs must be >= 0, got {self.num_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Whether this row needs the sorted top-k / top-p path (greedy rows never do)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


@dataclass
class SamplerOutput:
    """Per row of the batch: the chosen token and its raw logprobs (see the module docstring)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[list[tuple[int, float]]]  # (token_id, logprob), best first; [] when not asked


class Sampler:
    """Samples one token per row of a logits batch; stateless apart from the shared generator."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 allowed: TokenBitmask | None = None) -> SamplerOutput:
        """Choose a token for each row of ``logits [B, V]`` (any float dtype; the math runs in float32),
        among the tokens ``allowed`` leaves its rows."""
        return self.launch(logits, rows, allowed).result()

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               allowed: TokenBitmask | None = None) -> PendingSample:
        """Queue the sampling work on the logits' device and return at once; ``result()`` waits for it.

        The chosen ids stay on the device (``PendingSample.token_ids``), so the next decode step can take
        them as its input before the host has seen them.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        logits = logits.float()
        stats = cpu_argmax_logsumexp(logits)  # the CPU's one-pass (argmax, log-sum-exp), when it has it
        argmax = torch.argmax(logits, dim=-1) if stats is None else stats[0]
        if allowed is None:
            token_ids = self._choose(logits, rows, argmax)
        else:
            masked = allowed.apply(logits)
            greedy = [i for i in allowed.rows if rows[i].greedy]  # only they need the argmax within the mask
            best = argmax
            if greedy:
                index = torch.tensor(greedy, device=logits.device)
                best = argmax.clone().index_copy_(0, index, masked.index_select(0, index).argmax(dim=-1))
            token_ids = self._choose(masked, rows, best)
        num_logprobs = [row.num_logprobs for row in rows]
        top_n = min(max(num_logprobs, default=0), logits.shape[1])
        if stats is None:
            packed = _pack(logits, token_ids, top_n)
        else:
            packed = _pack_with_stats(logits, token_ids, top_n, *stats)
        return PendingSample(token_ids, packed, num_logprobs, top_n)

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow], argmax: torch.Tensor) -> torch.Tensor:
        sampled = [i for i, row in enumerate(rows) if not row.greedy]
        if not sampled:
            return argmax
        device = logits.device
        rows = [rows[i] for i in sampled]
        index = torch.tensor(sampled, device=device)
        temperature = torch.tensor([row.temperature for row in rows], device=device)
        scores = logits.index_select(0, index) / temperature[:, None]
        if any(row.filtered for row in rows):
            top_k = [row.top_k if row.filtered else 0 for row in rows]
            top_p = [row.top_p if row.filtered else 1.0 for row in rows]
            scores = filter_logits(
                scores,
                top_k=torch.tensor(top_k, device=device) if any(top_k) else None,
                top_p=torch.tensor(top_p, device=device) if min(top_p) < 1.0 else None,
            )
        cdf = torch.softmax(scores, dim=-1).cumsum_(dim=-1)
        total = cdf[:, -1:]
        # Strictly below the total, so the search never runs past the last token of non-zero probability.
        target = torch.minimum(self._uniforms(rows, device)[:, None] * total, total * (1 - 2**-23))
        chosen = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return argmax.clone().index_copy_(0, index, chosen)

    def _uniforms(self, rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
        """One ``U[0, 1)`` number per row: from its own generator, or all from the shared one."""
        out = torch.empty(len(rows), device=device)
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            out[shared] = torch.rand(len(shared), device=device, generator=self._shared_generator(device))
        for i, row in enumerate(rows):
            if row.generator is not None:
                out[i] = torch.rand(1, device=device, generator=row.generator)[0]
        return out

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator


def top_ids(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Ids of each row's ``n`` best tokens, ordered by (logit descending, id ascending).

    ``torch.topk`` leaves the order of equal values open, and ties are common in bfloat16; so the float
    bits become an order-preserving integer with the id below them, and the best of an exact tie is the
    lowest id, the one greedy decoding picks.
    """
    if n == 0:
        return torch.empty(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    bits = logits.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as integers
    ids = torch.arange(logits.shape[1], device=logits.device)
    _, top = torch.topk(ordered * (1 << 24) - ids, n, dim=-1)
    return top


def _pack(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int) -> torch.Tensor:
    """Each row's chosen id, rank, raw logprob and top-n ids and logprobs, as one float64 tensor
    (float64 holds ids and ranks exactly), so one copy brings everything to the host."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = token_ids[:, None]
    ranks = (logits > logits.gather(1, chosen)).sum(dim=-1, keepdim=True) + 1
    best = top_ids(logits, top_n)
    parts = [chosen, ranks, logprobs.gather(1, chosen), best, logprobs.gather(1, best)]
    return torch.cat([part.double() for part in parts], dim=-1)


def _pack_with_stats(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int, argmax: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """``_pack`` given each row's argmax and log-sum-exp: a logprob is a logit minus the row's log-sum-exp,
    and a row that took its argmax has rank 1, so only the other rows count larger logits."""
    chosen = token_ids[:, None]
    picked = logits.gather(1, chosen)
    ranks = torch.ones_like(chosen)
    if token_ids is not argmax:  # some rows drew a token (all-greedy batches pass ``argmax`` itself)
        other = torch.nonzero(token_ids != argmax).squeeze(1)
        if other.numel():
            ranks[other] = (logits[other] > picked[other]).sum(dim=-1, keepdim=True) + 1
    best = top_ids(logits, top_n)
    lse = lse[:, None]
    parts = [chosen, ranks, picked - lse, best, logits.gather(1, best) - lse]
    return torch.cat([part.double() for part in parts], dim=-1)


class PendingSample:
    """Sampling queued on the device: ``token_ids`` there now, everything on the host after ``result()``.

    On a GPU the packed results start their copy into pinned host memory at once and an event marks its
    end, so ``result()`` waits for this sample only, not for work queued on the device after it.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, num_logprobs: list[int], top_n: int):
        self.token_ids = token_ids
        self.num_logprobs, self.top_n = num_logprobs, top_n
        self._event = None
        if packed.is_cuda:
            self._packed = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._packed.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._packed = packed

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        top_n = self.top_n
        rows = self._packed.tolist()
        columns = list(zip(*rows)) if rows else [()] * 3
        if top_n:
            top = [[(int(r[3 + j]), r[3 + top_n + j]) for j in range(min(n, top_n))] for r, n in zip(rows, self.num_logprobs)]
        else:
            top = [[] for _ in rows]
        return SamplerOutput(
            token_ids=list(map(int, columns[0])), ranks=list(map(int, columns[1])), logprobs=list(columns[2]),
            top_logprobs=top,
        )
