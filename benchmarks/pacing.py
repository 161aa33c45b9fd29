"""Pacing: a line read aloud at 5 tokens/s beside 15 unpaced ones, against 16 unpaced, CPU, default model.

Both runs start 16 requests at once (64-token prompts, ``--new-tokens`` greedy tokens each, EOS ignored).
In the first all are unpaced; in the second one asks ``max_tokens_per_second=5``. Reported: the paced
stream's rate (tokens after its first, over the time after its first), and the unpaced streams' decode
rate, per stream and summed (the same count over the time from the last first token to the last
token). The goal: the paced stream at most 5 tokens/s, the others faster than in the run of 16.

    python benchmarks/pacing.py [--repeats 3] [--threads 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, summarize, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL  # noqa: E402

STREAMS, PROMPT, RATE = 16, 64, 5.0


def run(engine: LLMEngine, paced: bool, new_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    reqs = [GenerationRequest(prompt_token_ids=[rng.randrange(1000, 40000) for _ in range(PROMPT)],
                              max_new_tokens=new_tokens, temperature=0, ignore_eos=True,
                              max_tokens_per_second=RATE if paced and i == 0 else None) for i in range(STREAMS)]
    results = engine.generate(reqs)
    others = results[1:] if paced else results
    first = max(r.metrics["ttft_ms"] for r in others)
    last = max(r.metrics["total_ms"] for r in others)
    rates = [(len(r.token_ids) - 1) / ((r.metrics["total_ms"] - r.metrics["ttft_ms"]) / 1000) for r in others]
    out = {"others_tok_s_per_stream": statistics.median(rates),
           "others_tok_s_summed": sum(len(r.token_ids) for r in others) / ((last - first) / 1000)}
    if paced:
        p = results[0]
        out["paced_tok_s"] = (len(p.token_ids) - 1) / ((p.metrics["total_ms"] - p.metrics["ttft_ms"]) / 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pacing"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=STREAMS, max_seq_len=512))
    run(engine, False, 8, seed=99)  # warm-up
    runs = {"16 unpaced": [], "15 unpaced + 1 at 5 tok/s": []}
    for r in range(args.repeats):  # alternated, so that load changes hit both alike
        runs["16 unpaced"].append(run(engine, False, args.new_tokens, seed=r))
        runs["15 unpaced + 1 at 5 tok/s"].append(run(engine, True, args.new_tokens, seed=r))
    summary = {name: {key: summarize([x[key] for x in xs], higher_is_better=True) for key in xs[0]}
               for name, xs in runs.items()}
    rows = [[name, f"{s['others_tok_s_per_stream']['median']:.1f}", f"{s['others_tok_s_summed']['median']:.0f}",
             f"{s['paced_tok_s']['median']:.2f} (max {s['paced_tok_s']['best']:.2f})" if "paced_tok_s" in s else "-"]
            for name, s in summary.items()]
    table = markdown_table(["run", "unpaced tok/s per stream", "unpaced tok/s summed", "paced stream tok/s"], rows)
    machine = machine_info()
    text = (f"# Pacing: 1 stream at {RATE:g} tok/s beside 15\n\n{machine['cpu']}, {args.threads} threads, "
            f"{engine.dtype}, {PROMPT}-token prompts, {args.new_tokens} new tokens, medians of {args.repeats}; "
            f"`python benchmarks/pacing.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
    write_results(args.out, {"machine": machine, "threads": args.threads, "runs": runs, "summary": summary}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
