"""What exact replay costs: ``deterministic=True`` against the same requests without it, CPU, default model.

Three workloads, greedy, EOS ignored, in the engine's default dtype: one stream decoding, 16 streams
decoding (64-token prompts), and the first token of a 500-token prompt. A deterministic request attends
one query at a time (prompts included) and runs its steps' matrix products under the batch-invariant row
plan the engine probes once (``gllm.ops.invariant``); the probe's time is reported too.

    python benchmarks/replay_cost.py [--repeats 3] [--threads 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Stopwatch, machine_info, markdown_table, summarize, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL  # noqa: E402


def requests(n: int, prompt: int, new_tokens: int, exact: bool, seed: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    return [GenerationRequest(prompt_token_ids=[rng.randrange(1000, 40000) for _ in range(prompt)],
                              max_new_tokens=new_tokens, temperature=0, ignore_eos=True, deterministic=exact)
            for _ in range(n)]


def decode_tok_s(engine: LLMEngine, n: int, new_tokens: int, exact: bool, seed: int) -> float:
    """Tokens after each stream's first, over the time from the last first token to the end."""
    results = engine.generate(requests(n, 64, new_tokens, exact, seed))
    first = max(r.metrics["ttft_ms"] for r in results)
    last = max(r.metrics["total_ms"] for r in results)
    return sum(len(r.token_ids) - 1 for r in results) / ((last - first) / 1000)


def prompt_ms(engine: LLMEngine, exact: bool, seed: int) -> float:
    engine.block_manager.pool.clear_cache()
    return engine.generate(requests(1, 500, 1, exact, seed))[0].metrics["ttft_ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "replay_cost"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=16, max_seq_len=1024))
    with Stopwatch() as probe:
        engine._prepare_exact()
    workloads = {
        "1 stream, decode tok/s": lambda exact, r: decode_tok_s(engine, 1, args.new_tokens, exact, r),
        "16 streams, decode tok/s summed": lambda exact, r: decode_tok_s(engine, 16, args.new_tokens, exact, r),
        "first token of a 500-token prompt (ms)": lambda exact, r: prompt_ms(engine, exact, r),
    }
    results = {}
    for name, fn in workloads.items():
        fn(False, 99)  # warm-up
        fn(True, 99)
        plain, exact = [], []
        for r in range(args.repeats):  # alternated, so that load changes hit both alike
            plain.append(fn(False, r))
            exact.append(fn(True, r))
        results[name] = {"default": summarize(plain), "deterministic": summarize(exact)}
    rows = [[name, f"{v['default']['median']:.1f}", f"{v['deterministic']['median']:.1f}",
             f"{v['deterministic']['median'] / v['default']['median']:.2f}x"] for name, v in results.items()]
    machine = machine_info()
    text = (f"# Exact replay: what deterministic requests cost\n\n{machine['cpu']}, {args.threads} threads, "
            f"{engine.dtype}, row plan {engine.runner.exact_plan} (probed in {probe.seconds:.1f} s), medians of "
            f"{args.repeats}; `python benchmarks/replay_cost.py {' '.join(sys.argv[1:])}`\n\n"
            + markdown_table(["workload", "default", "deterministic", "ratio"], rows) + "\n")
    write_results(args.out, {"machine": machine, "threads": args.threads, "plan": str(engine.runner.exact_plan),
                             "probe_s": probe.seconds, "results": results}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
