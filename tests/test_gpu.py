"""GPU-only checks (run by benchmarks/gpu.sh on a CUDA machine): CUDA graphs and the Triton backend.

The CPU suite covers the same kernels under Triton's interpreter (test_triton_attention.py) and the engine
logic everywhere else; these tests need a real GPU because CUDA graphs only exist there.
"""

from __future__ import annotations

import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu.sh)")


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (int(l),), generator=gen).tolist() for l in torch.randint(3, 90, (n,), generator=gen)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_give_the_same_greedy_tokens(gqa_model, dtype):
    folder, _ = gqa_model
    reqs = lambda: [GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0) for p in prompts(5)]  # noqa: E731
    params = GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=256)
    eager = LLMEngine(folder, params, device="cuda", dtype=dtype, cuda_graphs=False)
    graphed = LLMEngine(folder, params, device="cuda", dtype=dtype, cuda_graphs=True)
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    expected = [r.token_ids for r in eager.generate(reqs())]
    assert [r.token_ids for r in graphed.generate(reqs())] == expected
    assert graphed.stats()["kv_blocks_in_use"] == 0


def test_triton_backend_matches_torch_backend(gqa_model):
    folder, _ = gqa_model
    params = GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=256)
    runs = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(folder, params, device="cuda", dtype=torch.float32, attention=backend, cuda_graphs=False)
        assert engine.attention.name == backend
        runs[backend] = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0) for p in prompts(6)])
    for a, b in zip(runs["torch"], runs["triton"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overlapped_decoding_gives_the_same_tokens(gqa_model, dtype):
    """Graphs with the next step queued before the host reads the last one, against plain graphed steps."""
    folder, _ = gqa_model
    reqs = lambda: [GenerationRequest(prompt_token_ids=p, max_new_tokens=5 + 7 * i, temperature=0)  # noqa: E731
                    for i, p in enumerate(prompts(6))]
    params = GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=256)
    plain = LLMEngine(folder, params, device="cuda", dtype=dtype, overlap=False)
    ahead = LLMEngine(folder, params, device="cuda", dtype=dtype)
    assert ahead.overlap and not plain.overlap
    expected = [r.token_ids for r in plain.generate(reqs())]
    assert [r.token_ids for r in ahead.generate(reqs())] == expected
    assert ahead.stats()["steps_ahead"] > 10
    while ahead.has_work():
        ahead.step()
    assert ahead.stats()["kv_blocks_in_use"] == 0


def test_fused_triton_graphs_match_the_torch_backend_in_bfloat16(gqa_model):
    """Everything on (Triton kernels, CUDA graphs, overlap) against eager torch ops, both bfloat16."""
    folder, _ = gqa_model
    params = GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=256)
    reqs = lambda: [GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0) for p in prompts(6)]  # noqa: E731
    eager = LLMEngine(folder, params, device="cuda", dtype=torch.bfloat16, attention="torch", cuda_graphs=False, overlap=False)
    fast = LLMEngine(folder, params, device="cuda", dtype=torch.bfloat16)
    assert fast.attention.name == "triton" and fast.runner.graphs is not None
    assert [r.token_ids for r in fast.generate(reqs())] == [r.token_ids for r in eager.generate(reqs())]
