"""Sampler tests: filters against a pure-Python reference, raw logprobs, seeds, and draw frequencies."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gllm.sample import Sampler, SamplingRow, apply_top_k, apply_top_p
from gllm.sample.filters import filter_logits

INF = float("inf")


# --- pure-Python reference of the documented tie rule -------------------------------------------------


def ref_order(row: list[float]) -> list[int]:
    """Token ids by (logit descending, index ascending): the order both filters keep a prefix of."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def ref_top_k(row: list[float], k: int) -> list[float]:
    if k == 0:
        return list(row)
    keep = set(ref_order(row)[:k])
    return [x if i in keep else -INF for i, x in enumerate(row)]


def ref_top_p(row: list[float], p: float) -> tuple[list[float], bool]:
    """Masked row, and whether float32 rounding could flip a boundary decision (cumulative within 1e-5 of p)."""
    if p >= 1.0:
        return list(row), False
    top = max(row)
    weights = [0.0 if x == -INF else math.exp(x - top) for x in row]
    total = sum(weights)
    keep, before, ambiguous = set(), 0.0, False
    for rank, i in enumerate(ref_order(row)):
        ambiguous |= rank > 0 and abs(before - p) < 1e-5
        if rank == 0 or before < p:
            keep.add(i)
        before += weights[i] / total
    return [x if i in keep else -INF for i, x in enumerate(row)], ambiguous


def ref_probs(row: list[float]) -> list[float]:
    top = max(row)
    weights = [0.0 if x == -INF else math.exp(x - top) for x in row]
    return [w / sum(weights) for w in weights]


# --- strategies ---------------------------------------------------------------------------------------

# Small integers make ties (also at the filter boundaries) common; -inf stands for already-masked tokens.
logit_values = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-30, 30, width=32),
    st.just(-INF),
)
top_p_values = st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True))


@st.composite
def logit_rows(draw: st.DrawFn) -> list[list[float]]:
    batch, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    rows = draw(st.lists(st.lists(logit_values, min_size=vocab, max_size=vocab), min_size=batch, max_size=batch))
    return [row if max(row) > -INF else [0.0, *row[1:]] for row in rows]


# --- filters ------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(rows=logit_rows(), data=st.data())
def test_top_k_matches_reference(rows: list[list[float]], data: st.DataObject) -> None:
    ks = data.draw(st.lists(st.integers(0, len(rows[0]) + 2), min_size=len(rows), max_size=len(rows)))
    out = apply_top_k(torch.tensor(rows), torch.tensor(ks))
    assert out.tolist() == [ref_top_k(row, k) for row, k in zip(rows, ks)]


@settings(max_examples=150, deadline=None)
@given(rows=logit_rows(), data=st.data())
def test_top_p_matches_reference(rows: list[list[float]], data: st.DataObject) -> None:
    ps = data.draw(st.lists(top_p_values, min_size=len(rows), max_size=len(rows)))
    expected = [ref_top_p(row, p) for row, p in zip(rows, ps)]
    assume(not any(ambiguous for _, ambiguous in expected))
    out = apply_top_p(torch.tensor(rows), torch.tensor(ps))
    assert out.tolist() == [masked for masked, _ in expected]


@settings(max_examples=150, deadline=None)
@given(rows=logit_rows(), data=st.data())
def test_top_k_then_top_p_matches_reference(rows: list[list[float]], data: st.DataObject) -> None:
    n = len(rows)
    ks = data.draw(st.lists(st.integers(0, len(rows[0]) + 2), min_size=n, max_size=n))
    ps = data.draw(st.lists(top_p_values, min_size=n, max_size=n))
    expected = [ref_top_p(ref_top_k(row, k), p) for row, k, p in zip(rows, ks, ps)]
    assume(not any(ambiguous for _, ambiguous in expected))
    out = filter_logits(torch.tensor(rows), top_k=torch.tensor(ks), top_p=torch.tensor(ps))
    assert out.tolist() == [masked for masked, _ in expected]


def test_ties_at_boundary_keep_lowest_indices() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert apply_top_k(logits, torch.tensor([2])).tolist() == [[-INF, 2.0, 2.0, -INF, -INF]]
    # Three tied tokens of ~1/3 each: 0.5 needs two of them, the lower two.
    assert apply_top_p(logits, torch.tensor([0.5])).tolist() == [[-INF, 2.0, 2.0, -INF, -INF]]
    # Four tied tokens of exactly 1/4: two reach 0.5 exactly, so a third is not needed.
    four = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert apply_top_p(four, torch.tensor([0.5])).tolist() == [[0.0, 0.0, -INF, -INF]]
    assert apply_top_p(four, torch.tensor([0.5001])).tolist() == [[0.0, 0.0, 0.0, -INF]]
    # A top_p so small it rounds to 0 in float32 still keeps the best token.
    assert apply_top_p(logits, torch.tensor([1e-50], dtype=torch.float64)).tolist() == [[-INF, 2.0] + [-INF] * 3]


# --- greedy, logprobs ---------------------------------------------------------------------------------


def tied_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Integer logits, so rows have ties at the top more often than not."""
    return torch.randint(-2, 3, (batch, vocab), generator=torch.Generator().manual_seed(seed)).float()


def test_temperature_zero_is_argmax_lowest_index() -> None:
    logits = tied_logits(64, 17, seed=0)
    out = Sampler(seed=0)(logits, [SamplingRow(temperature=0.0)] * 64)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()
    assert out.token_ids == [row.index(max(row)) for row in logits.tolist()]


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    logits = tied_logits(40, 17, seed=1)
    rows = [SamplingRow(temperature=0.0) if i % 2 else SamplingRow(temperature=1.5, top_k=3) for i in range(40)]
    out = Sampler(seed=0)(logits, rows)
    argmax = torch.argmax(logits, dim=-1).tolist()
    assert [t for i, t in enumerate(out.token_ids) if i % 2] == argmax[1::2]


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_k=1, top_p=0.9), dict(top_p=1e-9)])
def test_top_k_one_and_tiny_top_p_are_greedy(filters: dict[str, float]) -> None:
    logits = tied_logits(64, 23, seed=2)
    rows = [SamplingRow(temperature=0.5 + i / 32, **filters) for i in range(64)]  # type: ignore[arg-type]
    out = Sampler(seed=0)(logits, rows)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_ranks_and_top_n_are_raw_log_softmax(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 50, generator=generator) * 3).to(dtype)
    logits[5, :10] = logits[5].max()  # ties at the top
    rows = [
        SamplingRow(temperature=0.0, num_logprobs=5),
        SamplingRow(temperature=2.0, num_logprobs=0),
        SamplingRow(temperature=0.7, top_k=10, num_logprobs=1),
        SamplingRow(temperature=1.3, top_p=0.5, num_logprobs=60),  # more than V
        SamplingRow(temperature=5.0, generator=torch.Generator().manual_seed(1), num_logprobs=3),
        SamplingRow(temperature=1.0, num_logprobs=4),
    ]
    out = Sampler(seed=0)(logits, rows)
    raw = logits.float()
    expected = torch.log_softmax(raw, dim=-1)
    for i, row in enumerate(rows):
        token = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-6)
        assert out.ranks[i] == 1 + int((raw[i] > raw[i, token]).sum())
        top = out.top_logprobs[i]
        assert len(top) == min(row.num_logprobs, 50)
        assert len({token_id for token_id, _ in top}) == len(top)
        best = sorted(expected[i].tolist(), reverse=True)[: len(top)]
        assert [value for _, value in top] == pytest.approx(best, abs=1e-6)
        assert all(value == pytest.approx(expected[i, token_id].item(), abs=1e-6) for token_id, value in top)
    assert out.ranks[0] == 1


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, 8), [])
    assert out.token_ids == out.logprobs == out.ranks == out.top_logprobs == []


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(temperature=math.nan), dict(top_k=-1), dict(top_p=0.0),
               dict(top_p=1.5), dict(num_logprobs=-1)]
)
def test_invalid_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingRow(**kwargs)  # type: ignore[arg-type]


# --- seeds --------------------------------------------------------------------------------------------

VOCAB = 64


def step_logits(step: int) -> torch.Tensor:
    """The seeded request's logits at a step: the same whatever batch it runs in."""
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(1000 + step)) * 2


def seeded_sequence(target: dict[str, float], seed: int, crowded: bool, steps: int = 20) -> list[int]:
    """Tokens of one seeded request; when crowded, other rows of random settings join at random places."""
    layout = random.Random(seed + 7)
    sampler = Sampler(seed=None if crowded else 0)
    mine = SamplingRow(generator=torch.Generator().manual_seed(seed), **target)  # type: ignore[arg-type]
    tokens = []
    for step in range(steps):
        rows, logits = [mine], [step_logits(step)]
        if crowded:
            for _ in range(layout.randint(1, 5)):
                other = SamplingRow(
                    temperature=layout.choice([0.0, 0.5, 1.0, 2.0]),
                    top_k=layout.choice([0, 1, 5]),
                    top_p=layout.choice([1.0, 0.3, 0.9]),
                    generator=torch.Generator().manual_seed(layout.randint(0, 99)) if layout.random() < 0.5 else None,
                )
                at = layout.randint(0, len(rows))
                rows.insert(at, other)
                logits.insert(at, torch.randn(VOCAB) * 3)
        out = sampler(torch.stack(logits), rows)
        tokens.append(out.token_ids[rows.index(mine)])
    return tokens


@pytest.mark.parametrize(
    "target", [dict(temperature=1.3), dict(temperature=0.8, top_k=20), dict(temperature=1.0, top_p=0.8)]
)
def test_seeded_row_ignores_its_batch(target: dict[str, float]) -> None:
    alone = seeded_sequence(target, seed=42, crowded=False)
    assert seeded_sequence(target, seed=42, crowded=True) == alone
    assert seeded_sequence(target, seed=42, crowded=False) == alone
    assert seeded_sequence(target, seed=43, crowded=False) != alone  # the seed matters at all


def test_shared_generator_is_reproducible() -> None:
    logits = torch.randn(8, VOCAB)
    rows = [SamplingRow(temperature=1.0, top_p=0.95)] * 8
    assert Sampler(seed=5)(logits, rows).token_ids == Sampler(seed=5)(logits, rows).token_ids


# --- draw frequencies ---------------------------------------------------------------------------------


def assert_frequencies_match(tokens: list[int], expected: list[float]) -> None:
    """Every token's frequency within 5 standard deviations of its probability (fixed seeds: not flaky)."""
    n = len(tokens)
    for token_id, p in enumerate(expected):
        frequency = tokens.count(token_id) / n
        assert abs(frequency - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (token_id, frequency, p)


LOGITS = [1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5, 0.7]


def test_shared_draws_follow_softmax_over_temperature() -> None:
    n, temperature = 20_000, 0.7
    logits = torch.tensor(LOGITS).expand(n, -1)
    out = Sampler(seed=0)(logits, [SamplingRow(temperature=temperature)] * n)
    assert_frequencies_match(out.token_ids, ref_probs([x / temperature for x in LOGITS]))


def test_seeded_draws_follow_softmax_over_temperature() -> None:
    n, temperature = 4_000, 1.6
    logits = torch.tensor(LOGITS).expand(n, -1)
    rows = [SamplingRow(temperature=temperature, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    out = Sampler()(logits, rows)
    assert_frequencies_match(out.token_ids, ref_probs([x / temperature for x in LOGITS]))


def test_filtered_draws_follow_the_renormalised_nucleus() -> None:
    n, temperature, top_k, top_p = 20_000, 1.5, 6, 0.7
    logits = torch.tensor(LOGITS).expand(n, -1)
    out = Sampler(seed=1)(logits, [SamplingRow(temperature=temperature, top_k=top_k, top_p=top_p)] * n)
    scaled = (torch.tensor(LOGITS) / temperature).tolist()
    kept, ambiguous = ref_top_p(ref_top_k(scaled, top_k), top_p)
    assert not ambiguous
    assert_frequencies_match(out.token_ids, ref_probs(kept))


def test_masked_tokens_are_never_sampled() -> None:
    n, vocab = 3_000, 40
    logits = tied_logits(1, vocab, seed=4)[0]
    # Interleaved settings, so each row is filtered by its own and not its neighbours'.
    options = [(1.2, 7, 1.0), (0.6, 0, 0.6), (2.0, 12, 0.5), (1.0, 3, 0.99)]
    rows = [SamplingRow(temperature=t, top_k=k, top_p=p) for t, k, p in options] * (n // len(options))
    out = Sampler(seed=2)(logits.expand(len(rows), -1), rows)
    for start, (t, k, p) in enumerate(options):
        kept, ambiguous = ref_top_p(ref_top_k((logits / t).tolist(), k), p)
        assert not ambiguous
        allowed = {i for i, x in enumerate(kept) if x > -INF}
        assert 1 < len(allowed) < vocab
        assert set(out.token_ids[start :: len(options)]) <= allowed


def test_top_n_orders_ties_by_lowest_id_like_greedy() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 2.0, -3.0, 0.5], [-0.0, 0.0, -2.5, -2.5, -7.0, -2.5, -1.0]])
    out = Sampler()(logits, [SamplingRow(temperature=0.0, num_logprobs=5)] * 2)
    assert out.token_ids == [1, 0]
    assert [t for t, _ in out.top_logprobs[0]] == [1, 3, 4, 0, 6]
    assert [t for t, _ in out.top_logprobs[1]][2:] == [6, 2, 3]
    for row, top in zip(logits, out.top_logprobs):
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert all(abs(lp - torch.log_softmax(row, -1)[t].item()) < 1e-6 for t, lp in top)


def test_long_rows_filtered_among_their_best_tokens_match_a_full_sort(monkeypatch) -> None:
    """A vocabulary longer than the candidate count: the same masks as sorting every token, for top-k,
    top-p and both, with ties around the boundary (which send their row to the full sort)."""
    from gllm.sample import filters

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 3000, generator=gen) * 3
    logits[1, :] = torch.randn(3000, generator=gen).round()  # coarse values: ties everywhere
    logits[2, 100:140] = logits[2].max() + 1  # a tied top group
    logits[3, ::2] = float("-inf")  # masked tokens
    settings_ = [
        (torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([0.9, 0.5, 0.95, 0.8, 1.0, 0.3])),
        (torch.tensor([50, 5, 20, 0, 300, 1]), None),
        (torch.tensor([40, 0, 10, 7, 0, 100]), torch.tensor([0.9, 0.7, 1.0, 0.5, 0.99, 0.2])),
        (None, torch.tensor([0.97, 1.0, 0.999, 0.9, 0.6, 0.1])),
    ]
    for top_k, top_p in settings_:
        fast = filters.filter_logits(logits, top_k=top_k, top_p=top_p)
        with monkeypatch.context() as m:
            m.setattr(filters, "CANDIDATES", 10**9)  # every row sorted in full
            full = filters.filter_logits(logits, top_k=top_k, top_p=top_p)
        assert torch.equal(fast, full)
    # the fast path decides these rows itself (no fallback), and so does not always sort
    _, undecided = filters._filter_best(logits[[0, 3, 5]], torch.tensor([50, 0, 1]), torch.tensor([0.9, 0.8, 0.3]))
    assert not undecided.any()
    _, undecided = filters._filter_best(logits[[1]], torch.tensor([0]), torch.tensor([0.5]))  # ties at its boundary
    assert undecided.tolist() == [True]
    # a row sorted in full leaves the others' masks as they are alone: no row depends on its batch
    rows, top_p = logits[[0, 1, 5]], torch.tensor([0.9, 0.5, 0.3])
    together = filters.filter_logits(rows, top_k=None, top_p=top_p)
    for i in (0, 2):
        assert torch.equal(together[i], filters.filter_logits(rows[i : i + 1], top_k=None, top_p=top_p[i : i + 1])[0])
