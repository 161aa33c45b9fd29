"""gLLM's engine against Hugging Face ``generate`` on the default model (SmolLM2-135M), same weights, CPU.

Why this benchmark: gLLM exists to serve many game characters at once from one small local model, so
it must (a) not be slower than plain ``transformers`` for one request, and (b) turn its continuous
batching over a paged KV cache into clearly more throughput when many requests arrive together.

Workloads, greedy, every stream exactly ``--new-tokens`` new tokens (``ignore_eos`` / ``min_new_tokens``):

* (a) one request, a ~20-token prompt: time to first token and decode tokens/s after it. The greedy
  tokens of both systems are compared (they should be identical in float32: same GGUF weights).
* (b) 16 requests with 20-200-token prompts (random token ids, fixed seed): generated tokens / wall
  time. gLLM gets them all at once through ``LLMEngine.generate``; HF runs them as one left-padded batch
  (attention mask, pad = eos), which is HF's own way to batch.

Both models live in one process and share its torch threads; the runs of the two systems alternate, so
that noise from other work on the machine hits both alike. Each number is the median of ``--repeats``
runs after a warm-up; the JSON keeps every run.

    python benchmarks/engine_vs_hf.py            # full run, writes benchmarks/results/engine_vs_hf.{json,md}
    python benchmarks/engine_vs_hf.py --quick    # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this file, run as a script

from common import Stopwatch, machine_info, markdown_table, summarize, write_results  # noqa: E402

MODEL = "smollm2-135m-instruct"
SHORT_PROMPT = (
    "The old blacksmith of our village worked late every night, and the sound of his hammer rang across the square"
)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per stream (default 128; 16 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default 3; 1 with --quick)")
    p.add_argument("--batch", type=int, default=16, help="number of requests in workload (b)")
    p.add_argument("--min-prompt", type=int, default=20, help="shortest prompt of workload (b), tokens")
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt of (b), tokens (default 200; 80 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of workload (b)'s prompt lengths and token ids")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run")
    p.add_argument(
        "--out", default=None,
        help="output path without suffix (default benchmarks/results/engine_vs_hf[_bfloat16][_tN][_quick])",
    )
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.max_prompt = args.max_prompt or (80 if args.quick else 200)
    if args.out is None:
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        suffix += (f"_t{args.threads}" if args.threads else "") + ("_quick" if args.quick else "")
        args.out = str(RESULTS / f"engine_vs_hf{suffix}")
    return args


def batch_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of random lengths and random ordinary token ids (no shared prefixes to cache)."""
    rng = random.Random(seed)
    first_ordinary = 100  # SmolLM2 keeps its special tokens in the first few ids
    return [[rng.randrange(first_ordinary, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


# ----------------------------------------------------------------------------------------- the two systems
class HFSystem:
    """``transformers`` loading the same GGUF file; greedy ``generate`` with the default (dynamic) KV cache."""

    name = "HF transformers"

    def __init__(self, dtype: Any):
        import torch
        from transformers import AutoModelForCausalLM

        from gllm.loader.registry import resolve

        path = resolve(MODEL)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
        self.pad = self.model.generation_config.eos_token_id

    def _generate(self, input_ids: Any, mask: Any, n: int, streamer: Any = None) -> Any:
        with self.torch.inference_mode():
            return self.model.generate(
                input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=self.pad, streamer=streamer,
            )

    def single(self, prompt: list[int], n: int) -> dict[str, Any]:
        clock = _TokenClock()
        ids = self.torch.tensor([prompt])
        start = time.perf_counter()
        out = self._generate(ids, self.torch.ones_like(ids), n, clock)
        # clock.times[0] is the prompt (HF streams it first), then one entry per new token.
        first, last = clock.times[1], clock.times[-1]
        return _single_numbers(out[0, len(prompt):].tolist(), first - start, last - first, last - start)

    def batch(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        width = max(map(len, prompts))
        ids = self.torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])  # left padding
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = _TokenClock()
        with Stopwatch() as sw:
            out = self._generate(ids, mask, n, clock)
        tokens = out[:, width:].tolist()
        ttft_ms = (clock.times[1] - sw.start) * 1000  # the whole batch gets its first tokens together
        return {
            "tokens": tokens,
            "wall_s": sw.seconds,
            "tokens_per_s": sum(map(len, tokens)) / sw.seconds,
            "mean_ttft_ms": ttft_ms,
            "max_ttft_ms": ttft_ms,
        }


class _TokenClock:
    """A ``generate`` streamer that only records when each put (prompt, then every token) arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class GLLMSystem:
    """gLLM's ``LLMEngine`` on the same GGUF, prefix caching off so that repeats recompute their prompts."""

    name = "gLLM"

    def __init__(self, dtype: Any, batch: int, max_seq_len: int):
        from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

        self.request = GenerationRequest
        params = GeneratorParams(
            block_size=16, max_batch_size=batch, max_seq_len=max_seq_len, enable_prefix_caching=False
        )
        self.engine = LLMEngine(MODEL, params, device="cpu", dtype=dtype)

    def _requests(self, prompts: list[list[int]], n: int) -> list[Any]:
        return [self.request(prompt_token_ids=p, max_new_tokens=n, temperature=0, ignore_eos=True) for p in prompts]

    def single(self, prompt: list[int], n: int) -> dict[str, Any]:
        (result,) = self.engine.generate(self._requests([prompt], n))
        m = result.metrics  # measured from the request's arrival, like HF's numbers from the call
        ttft, total = m["ttft_ms"] / 1000, m["total_ms"] / 1000
        return _single_numbers(result.token_ids, ttft, total - ttft, total)

    def batch(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        with Stopwatch() as sw:
            results = self.engine.generate(self._requests(prompts, n))
        tokens = [r.token_ids for r in results]
        return {
            "tokens": tokens,
            "wall_s": sw.seconds,
            "tokens_per_s": sum(map(len, tokens)) / sw.seconds,
            "mean_ttft_ms": sum(r.metrics["ttft_ms"] for r in results) / len(results),
            "max_ttft_ms": max(r.metrics["ttft_ms"] for r in results),
        }


def _single_numbers(tokens: list[int], ttft_s: float, decode_s: float, total_s: float) -> dict[str, Any]:
    """Decode speed counts the tokens after the first one over the time after the first one."""
    return {
        "tokens": tokens,
        "ttft_ms": ttft_s * 1000,
        "decode_tokens_per_s": (len(tokens) - 1) / decode_s if decode_s > 0 else float("nan"),
        "total_s": total_s,
    }


# ------------------------------------------------------------------------------------------------ running
def run_workload(systems: list[Any], method: str, inputs: Any, n: int, repeats: int) -> dict[str, list[dict]]:
    """Warm each system up once (a few tokens), then alternate the systems for ``repeats`` rounds."""
    for system in systems:
        getattr(system, method)(inputs, min(n, 8))
    runs: dict[str, list[dict]] = {s.name: [] for s in systems}
    for r in range(repeats):
        for system in systems:
            run = getattr(system, method)(inputs, n)
            runs[system.name].append(run)
            shown = {k: round(v, 2) for k, v in run.items() if k != "tokens"}
            print(f"  ({method}) round {r + 1}/{repeats} {system.name}: {shown}", flush=True)
    return runs


def numbers(runs: list[dict], keys: list[str]) -> dict[str, Any]:
    """Summaries of each measured key; rates (``*_per_s``) are better when higher, times when lower."""
    return {k: summarize([run[k] for run in runs], higher_is_better=k.endswith("_per_s")) for k in keys}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How many streams have identical tokens, and where the others first differ."""
    firsts = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a, b)]
    return {"identical_streams": sum(f is None for f in firsts), "streams": len(a), "first_difference": firsts}


def table(res: dict[str, Any], hf: str, gl: str) -> str:
    """Markdown table; ratio = how many times better gLLM is (HF/gLLM for times, gLLM/HF for rates)."""
    a, b = res["single"], res["batch"]
    n, batch, reps = res["settings"]["new_tokens"], res["settings"]["batch"], res["settings"]["repeats"]

    def row(label: str, part: dict, key: str, fmt: str, higher_is_better: bool) -> list[str]:
        x, y = part[hf][key], part[gl][key]
        ratio = y["median"] / x["median"] if higher_is_better else x["median"] / y["median"]
        cell = lambda s: f"{s['median']:{fmt}} ({s['best']:{fmt}})"  # noqa: E731
        return [label, cell(x), cell(y), f"{ratio:.2f}x"]

    same = a["greedy_tokens_identical"]
    rows = [
        row("(a) 1 request, time to first token (ms, lower is better)", a, "ttft_ms", ".1f", False),
        row(f"(a) 1 request, decode tokens/s ({n} new tokens)", a, "decode_tokens_per_s", ".1f", True),
        row(f"(b) {batch} requests, generated tokens/s (HF: one left-padded batch)", b, "tokens_per_s", ".1f", True),
        row(f"(b) {batch} requests, time to first token, mean over requests (ms)", b, "mean_ttft_ms", ".0f", False),
        ["(a) greedy tokens identical", "-", "-", "yes" if same else "NO"],
        ["(b) streams with identical greedy tokens", "-", "-", f"{b['agreement']['identical_streams']}/{batch}"],
    ]
    m, threads = res["machine"], res["machine"]["torch_threads"]
    head = (
        f"# gLLM vs HF transformers: {res['model']}, {res['dtype']}, CPU\n\n"
        f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} ({threads} thread{'s' * (threads > 1)}), "
        f"transformers {m['transformers']}. Each cell: median of {reps} run{'s' * (reps > 1)} after a warm-up "
        f"(best run in brackets); ratio = how many times better gLLM is, from the medians. Load average before / after: "
        f"{res['load_average']['before']} / {res['load_average']['after']}.\n\n"
    )
    return head + markdown_table(["workload", "HF transformers", "gLLM", "ratio"], rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"loading {MODEL} ({args.dtype}) into gLLM and HF transformers ...", flush=True)
    gl = GLLMSystem(dtype, args.batch, max_seq_len=args.max_prompt + args.new_tokens)
    hf = HFSystem(dtype)
    systems = [hf, gl]
    short = gl.engine.tokenizer.encode(SHORT_PROMPT)
    prompts = batch_prompts(args.batch, args.min_prompt, args.max_prompt, gl.engine.config.vocab_size, args.seed)

    load_before = os.getloadavg()
    print(f"(a) one request, {len(short)}-token prompt, {args.new_tokens} new tokens", flush=True)
    single = run_workload(systems, "single", short, args.new_tokens, args.repeats)
    print(f"(b) {args.batch} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens", flush=True)
    batch = run_workload(systems, "batch", prompts, args.new_tokens, args.repeats)

    hf_a, gl_a = single[hf.name], single[gl.name]
    res: dict[str, Any] = {
        "benchmark": "engine_vs_hf",
        "model": MODEL,
        "dtype": args.dtype,
        "machine": machine_info(),
        # 1-, 5- and 15-minute load: above the core count means other work shared the cores.
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {
            "new_tokens": args.new_tokens, "repeats": args.repeats, "batch": args.batch, "seed": args.seed,
            "short_prompt_tokens": len(short), "batch_prompt_tokens": [len(p) for p in prompts],
            "gllm": "LLMEngine.generate, block_size 16, prefix caching off, greedy, ignore_eos",
            "hf": "model.generate, greedy, min_new_tokens = max_new_tokens, (b) one left-padded batch",
            "warmup": "one run of min(8, new_tokens) tokens per system and workload",
            "argv": sys.argv[1:],
        },
        "single": {
            hf.name: numbers(hf_a, ["ttft_ms", "decode_tokens_per_s", "total_s"]),
            gl.name: numbers(gl_a, ["ttft_ms", "decode_tokens_per_s", "total_s"]),
            "greedy_tokens_identical": all(h["tokens"] == g["tokens"] for h, g in zip(hf_a, gl_a)),
            "tokens": {hf.name: hf_a[0]["tokens"], gl.name: gl_a[0]["tokens"]},
        },
        "batch": {
            hf.name: numbers(batch[hf.name], ["tokens_per_s", "wall_s", "mean_ttft_ms", "max_ttft_ms"]),
            gl.name: numbers(batch[gl.name], ["tokens_per_s", "wall_s", "mean_ttft_ms", "max_ttft_ms"]),
            "agreement": agreement(batch[hf.name][0]["tokens"], batch[gl.name][0]["tokens"]),
        },
        "gllm_stats": gl.engine.stats(),
    }
    md = table(res, hf.name, gl.name)
    json_path, md_path = write_results(args.out, res, md)
    print("\n" + md + f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
