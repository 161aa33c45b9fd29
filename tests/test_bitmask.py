"""The sampler's token bitmask: allowed tokens only, before temperature, top-k and top-p; raw logprobs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gllm.sample import Sampler, SamplingRow, TokenBitmask


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """Booleans [R, V] as int32 words (bit j of word w = token 32 w + j), the layout llguidance fills."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, (vocab + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(1, 200), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_unpacking_matches_the_bits(vocab, rows, seed):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, vocab, generator=g) < 0.3
    mask = TokenBitmask(list(range(rows)), pack(allowed))
    assert torch.equal(mask.allowed(vocab, torch.device("cpu")), allowed)
    assert not mask.allowed(vocab + 40, torch.device("cpu"))[:, (vocab + 31) // 32 * 32 :].any()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 0.7, 1.5]), top_k=st.sampled_from([0, 3]),
       top_p=st.sampled_from([1.0, 0.5]))
def test_sampled_tokens_are_allowed_and_logprobs_stay_raw(seed, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 1000, generator=g) * 3
    allowed = torch.rand(2, 1000, generator=g) < 0.05
    allowed[:, 7] = True
    masked_rows = [1, 3]
    rows = [SamplingRow(temperature, top_k, top_p, num_logprobs=2, generator=torch.Generator().manual_seed(seed + i))
            for i in range(4)]
    out = Sampler()(logits, rows, TokenBitmask(masked_rows, pack(allowed)))
    raw = torch.log_softmax(logits, dim=-1)
    for i, row in enumerate(masked_rows):
        token = out.token_ids[row]
        assert allowed[i, token]
        if temperature == 0.0:
            assert token == int(logits[row].masked_fill(~allowed[i], float("-inf")).argmax())
        assert abs(out.logprobs[row] - raw[row, token].item()) < 1e-5
        assert out.ranks[row] == int((logits[row] > logits[row, token]).sum()) + 1
        assert out.top_logprobs[row][0][0] == int(logits[row].argmax())  # the model's favourite, allowed or not
    # Unmasked rows sample exactly as without any mask.
    plain = Sampler()(logits, [SamplingRow(temperature, top_k, top_p, 2, torch.Generator().manual_seed(seed + i))
                               for i in range(4)])
    assert [out.token_ids[i] for i in (0, 2)] == [plain.token_ids[i] for i in (0, 2)]


def test_a_single_allowed_token_is_always_chosen():
    logits = torch.randn(1, 50)
    allowed = torch.zeros(1, 50, dtype=torch.bool)
    allowed[0, 42] = True
    for seed in range(5):
        row = SamplingRow(1.0, generator=torch.Generator().manual_seed(seed))
        assert Sampler()(logits, [row], TokenBitmask([0], pack(allowed))).token_ids == [42]
