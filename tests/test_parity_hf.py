"""Greedy tokens and logprobs of the engine equal HF transformers on tiny random Llama models."""

from __future__ import annotations

import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

PROMPT_LENGTHS = [1, 7, 16, 33, 64, 100]
NEW_TOKENS = 24
# float32 on the CPU (CI) must agree to 1e-4. CUDA kernels sum in another order, and the large logits of
# these test models (wide random init) turn that into up to ~1.1e-4 there.
LOGPROB_TOL = {"cpu": 1e-4, "cuda": 2e-4}


def hf_greedy(model, prompt: list[int], n: int, device: str = "cpu") -> tuple[list[int], list[float], float]:
    """HF generate on one prompt alone (on ``device``, like the engine): tokens, their log-softmax, and the
    smallest top-1/top-2 logit gap."""
    out = model.generate(
        torch.tensor([prompt], device=device),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logits = torch.cat(out.logits).float().cpu()
    logprobs = logits.log_softmax(-1)[torch.arange(len(tokens)), tokens].tolist()
    top2 = logits.topk(2, dim=-1).values
    return tokens, logprobs, (top2[:, 0] - top2[:, 1]).min().item()


def test_greedy_matches_hf_with_staggered_arrivals(tiny_model, device):
    folder, hf = tiny_model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    # A small token budget splits long prompts into chunks that share batches with decodes.
    engine = LLMEngine(folder, GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=256, max_num_batched_tokens=40), device=device, dtype=torch.float32)
    ids = {}
    results = {}
    for step in range(10_000):
        if step % 3 == 0 and len(ids) < len(prompts):  # arrivals spread over time
            i = len(ids)
            ids[engine.add_request(GenerationRequest(prompt_token_ids=prompts[i], max_new_tokens=NEW_TOKENS, temperature=0))] = i
        for r in engine.step().finished:
            results[ids[r.request_id]] = r
        if len(results) == len(prompts):
            break
    assert engine.stats()["kv_blocks_in_use"] == 0
    hf.to(device)
    for i, prompt in enumerate(prompts):
        tokens, logprobs, gap = hf_greedy(hf, prompt, NEW_TOKENS, device)
        assert gap > 1e-4, "test model has near-ties; change its seed or init scale"
        assert results[i].token_ids == tokens, f"prompt {i} ({len(prompt)} tokens)"
        assert max(abs(a - b) for a, b in zip(results[i].logprobs, logprobs)) < LOGPROB_TOL[device]
        assert results[i].finish_reason == "length"
    hf.to("cpu")  # the model is shared with other tests
