"""KV reuse on the default model, CPU: prefix-cache hit vs miss, and scoring vs separate generations.

1. Time to first token with a 500-token shared persona prefix: a cold request (miss), then a request
   with the same prefix and a new 20-token line (hit). Goal: the hit costs at most 15% of the miss.
2. Ranking 30 candidates of 1 to 4 tokens after a 200-token prompt: one ScoreRequest vs 30 separate
   one-token generation requests that each recompute the prompt (prefix caching off). Goal: >= 5x.

    python benchmarks/kv_reuse.py [--dtype float32|bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Stopwatch, machine_info, markdown_table, summarize, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def words(n_tokens: int, engine: LLMEngine, seed: int) -> list[int]:
    """A deterministic text of exactly ``n_tokens`` tokens (persona-like filler)."""
    rng = random.Random(seed)
    vocab = "village forge ember river guard night tavern bread sword lantern quiet old north gate".split()
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += engine.tokenizer.encode(" " + " ".join(rng.choice(vocab) for _ in range(50)))
    return ids[:n_tokens]


def ttft(engine: LLMEngine, ids: list[int]) -> float:
    r = engine.generate([GenerationRequest(prompt_token_ids=ids, max_new_tokens=1, temperature=0)])[0]
    return r.metrics["ttft_ms"]


def prefix_hit_vs_miss(dtype: torch.dtype, repeats: int) -> dict:
    engine = LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=4, max_seq_len=1024), dtype=dtype)
    ttft(engine, words(64, engine, 99))  # warm-up
    miss, hit = [], []
    for r in range(repeats):
        prefix = words(500, engine, r)
        miss.append(ttft(engine, prefix + words(20, engine, 100 + r)))
        hit.append(ttft(engine, prefix + words(20, engine, 200 + r)))
    return {"miss_ms": summarize(miss), "hit_ms": summarize(hit)}


def scoring_vs_generations(dtype: torch.dtype, repeats: int) -> dict:
    engine = LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=32, max_seq_len=512, enable_prefix_caching=False), dtype=dtype)
    prompt = words(200, engine, 7)
    rng = random.Random(3)
    cands = [[rng.randrange(1000, 40000) for _ in range(rng.randint(1, 4))] for _ in range(30)]
    engine.score(ScoreRequest(prompt_token_ids=prompt, candidates=cands[:2]))  # warm-up
    score_s, gen_s = [], []
    for _ in range(repeats):
        with Stopwatch() as sw:
            engine.score(ScoreRequest(prompt_token_ids=prompt, candidates=cands))
        score_s.append(sw.seconds)
        with Stopwatch() as sw:  # the naive way: each option asks the model again from scratch
            engine.generate([GenerationRequest(prompt_token_ids=prompt + c[:-1], max_new_tokens=1, temperature=0, logprobs=1) for c in cands])
        gen_s.append(sw.seconds)
    return {"score_s": summarize(score_s), "separate_s": summarize(gen_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/kv_reuse")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    prefix = prefix_hit_vs_miss(dtype, args.repeats)
    scoring = scoring_vs_generations(dtype, args.repeats)
    miss, hit = prefix["miss_ms"]["median"], prefix["hit_ms"]["median"]
    score, separate = scoring["score_s"]["median"], scoring["separate_s"]["median"]
    info = machine_info()
    rows = [
        ["TTFT, 500-token prefix + 20 new tokens: cache miss (ms)", f"{miss:.1f}", ""],
        ["TTFT, same prefix, new 20 tokens: cache hit (ms)", f"{hit:.1f}", f"hit = {hit / miss:.1%} of miss (goal <= 15%)"],
        ["rank 30 candidates (1-4 tokens) after 200 tokens: one ScoreRequest (ms)", f"{score * 1000:.0f}", ""],
        ["same, 30 separate requests recomputing the prompt (ms)", f"{separate * 1000:.0f}", f"{separate / score:.1f}x faster (goal >= 5x)"],
    ]
    md = (
        f"# KV reuse: {DEFAULT_MODEL}, {args.dtype}, CPU\n\n{info['cpu']}, {info['usable_cores']} cores, torch "
        f"{info['torch']} ({info['torch_threads']} threads). Medians of {args.repeats} runs after a warm-up.\n"
        f"Command: `python benchmarks/kv_reuse.py --dtype {args.dtype}`\n\n"
        + markdown_table(["measure", "value", "result"], rows)
    )
    write_results(args.out, {"machine": info, "model": DEFAULT_MODEL, "dtype": args.dtype, "prefix": prefix, "scoring": scoring}, md)
    print(md)


if __name__ == "__main__":
    main()
