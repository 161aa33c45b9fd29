"""Every supported family against HF transformers on tiny random checkpoints (``tests/families.py``).

Greedy tokens must be identical and logprobs within 1e-4 in float32, through staggered arrivals (prompt
chunks beside decodes), prompts longer than the sliding window, preemption, prefix-cache hits, forks,
scoring and overlapped decoding; bfloat16 and int8 weights stay within the bounds the default model's
tests use.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from gllm.ops.backend import triton_available
from gllm.ops.linear import packing_supported
from families import FAMILIES, WINDOW, build
from test_parity_hf import assert_greedy_matches_hf, hf_greedy, run_staggered

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build(request.param, folder)


def prompts(name: str, lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (max(n, FAMILIES[name].min_prompt),), generator=gen).tolist() for n in lengths]


def test_greedy_matches_hf_with_staggered_arrivals_and_preemption(family, device):
    name, folder, hf = family
    texts = prompts(name, [1, 7, 33, 100])
    assert max(map(len, texts)) > 4 * WINDOW
    # A small token budget splits long prompts into chunks; 16 blocks of 8 cannot hold all four at once (nor 7
    # with Mistral, which releases the blocks its window has passed).
    blocks = 7 if name == "mistral" else 16
    params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=256, max_num_batched_tokens=40,
                             num_kv_blocks=blocks)
    engine = LLMEngine(folder, params, device=device, dtype=torch.float32)
    reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=NEW_TOKENS, temperature=0) for p in texts]
    results = run_staggered(engine, reqs)
    stats = engine.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["preemptions"] > 0
    assert_greedy_matches_hf(hf, texts, results, NEW_TOKENS, device, label=f"{name}: ")


def test_overlapped_decoding_matches_hf(family, device):
    """Decode steps queued before the host reads the last one's tokens (``overlap``, the GPU default; with
    CUDA graphs there): the step ahead holds block tables from before the last update, which for Mistral
    has just released blocks behind the window."""
    name, folder, hf = family
    texts = prompts(name, [3, 20, 50], seed=8)
    params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=256, max_num_batched_tokens=24)
    engine = LLMEngine(folder, params, device=device, dtype=torch.float32, overlap=True)
    reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=NEW_TOKENS, temperature=0) for p in texts]
    results = run_staggered(engine, reqs)
    while engine.has_work():  # a step queued ahead for a finished sequence is drained without output
        engine.step()
    assert engine.stats()["steps_ahead"] > 0 and engine.stats()["kv_blocks_in_use"] == 0
    assert_greedy_matches_hf(hf, texts, results, NEW_TOKENS, device, label=f"{name}: ")


def hf_logprobs(hf, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """HF's log-probability of each token of ``continuation`` after ``prompt``."""
    ids = prompt + continuation
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logp[torch.arange(len(prompt) - 1, len(ids) - 1), torch.tensor(continuation)]


def test_prefix_cache_forks_and_scoring_match_hf(family):
    name, folder, hf = family
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=256), dtype=torch.float32)
    shared, tail = prompts(name, [40, 5], seed=2)
    first = engine.generate([GenerationRequest(prompt_token_ids=shared, max_new_tokens=8, temperature=0)])[0]
    assert first.token_ids == hf_greedy(hf, shared, 8)[0]
    # The same prefix again, longer: its full blocks come from the cache (past the sliding window, too).
    again = engine.generate([GenerationRequest(prompt_token_ids=shared + tail, max_new_tokens=8, temperature=0)])[0]
    assert again.num_cached_tokens >= len(shared) // 8 * 8 - 8
    tokens, logprobs, _ = hf_greedy(hf, shared + tail, 8)
    assert again.token_ids == tokens
    assert max(abs(a - b) for a, b in zip(again.logprobs, logprobs)) < 1e-4
    # Two forks of one prompt share its blocks; greedy, both are HF's continuation.
    fork = GenerationRequest(prompt_token_ids=shared + tail[:3], max_new_tokens=8, temperature=0, n=2)
    forked = engine.generate([fork])[0]
    expected = hf_greedy(hf, shared + tail[:3], 8)[0]
    assert [f.token_ids for f in forked.forks] == [expected, expected]
    # Candidates scored in one batch after the prompt.
    candidates = [tail[:1], tail[1:4], tail[::-1]]
    scores = engine.score(ScoreRequest(prompt_token_ids=shared, candidates=candidates))
    for candidate, score in zip(candidates, scores.candidates):
        assert torch.allclose(torch.tensor(score.token_logprobs), hf_logprobs(hf, shared, candidate), atol=1e-4)
    assert engine.stats()["kv_blocks_in_use"] == 0


# Bounds of tests/test_default_model.py: the chosen token's float32 logit below the float32 best, and its
# logprob against float32's, in nats.
REDUCED = {None: (0.5, 0.3), "int8": (0.75, 0.5)}


@pytest.mark.parametrize("quantize", [None, "int8"], ids=["bfloat16", "int8"])
def test_reduced_precision_stays_near_float32(family, quantize):
    if quantize and not packing_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("int8 weights need oneDNN bfloat16 kernels, which this CPU lacks")
    name, folder, hf = family
    texts = prompts(name, [5, 30, 70], seed=3)
    params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=256, max_num_batched_tokens=32)
    engine = LLMEngine(folder, params, dtype=torch.bfloat16, quantize=quantize)
    reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=12, temperature=0) for p in texts]
    results = run_staggered(engine, reqs)
    max_gap, max_error = REDUCED[quantize]
    for i, prompt in enumerate(texts):
        tokens = results[i].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
        chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert (logits.max(-1).values - chosen).max().item() < max_gap, name
        reference = logits.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert (reference - torch.tensor(results[i].logprobs)).abs().max().item() < max_error, name


def test_all_local_model_releases_blocks_behind_the_window(tmp_path):
    """Mistral 7B v0.1's shape (every layer local): a sequence holds only the blocks its window reaches, so
    116 tokens run in 6 blocks of 8 (15 without the release), with HF's tokens."""
    folder, hf = tmp_path, build("mistral", tmp_path)
    params = GeneratorParams(block_size=8, max_batch_size=2, max_seq_len=256, max_num_batched_tokens=16,
                             num_kv_blocks=6)
    engine = LLMEngine(folder, params, dtype=torch.float32)
    prompt = prompts("mistral", [100], seed=4)[0]
    engine.add_request(GenerationRequest(prompt_token_ids=prompt, max_new_tokens=NEW_TOKENS, temperature=0))
    peak, result = 0, None
    while result is None:
        out = engine.step()
        peak = max(peak, engine.stats()["kv_blocks_in_use"])
        result = out.finished[0] if out.finished else None
    assert peak <= (WINDOW - 1 + 16) // 8 + 2 and engine.stats()["kv_blocks_in_use"] == 0
    tokens, logprobs, _ = hf_greedy(hf, prompt, NEW_TOKENS)
    assert result.token_ids == tokens
    assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs)) < 1e-4



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_backends_match_hf(family, device, backend):
    """The plain torch ops (the CPU path without a compiler) and the Triton kernels (Triton's CPU
    interpreter without a GPU) on every family: windows, soft-caps, GELU gates, head sizes 16 and 32,
    prompt chunks beside decodes."""
    if backend == "triton" and not triton_available():
        pytest.skip("no GPU and no Triton interpreter")
    name, folder, hf = family
    texts = prompts(name, [7, 33], seed=6)
    params = GeneratorParams(block_size=8, max_batch_size=2, max_seq_len=128, max_num_batched_tokens=24)
    engine = LLMEngine(folder, params, device=device, dtype=torch.float32, attention=backend)
    assert engine.attention.name == backend
    reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=8, temperature=0) for p in texts]
    assert_greedy_matches_hf(hf, texts, run_staggered(engine, reqs), 8, device, label=f"{name}: ")


def test_multimodal_gemma3_checkpoint_runs_its_language_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: text under ``language_model.``, a vision
    tower beside it. The engine reads the language model alone and answers text prompts as HF does."""
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=6, max_position_embeddings=256)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    engine = LLMEngine(tmp_path, GeneratorParams(block_size=8, max_seq_len=128), dtype=torch.float32)
    assert engine.config.family == "gemma3_text" and engine.config.local_layers == (0, 1)
    prompt = prompts("gemma3", [40], seed=7)[0]
    assert_greedy_matches_hf(hf, [prompt], engine.generate([GenerationRequest(prompt_token_ids=prompt,
                                                                              max_new_tokens=8, temperature=0)]), 8)
