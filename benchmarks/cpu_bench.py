"""The CPU speed table: gLLM, HF ``transformers`` (float32 and bfloat16) and optionally llama.cpp, one run.

Workloads on the default model (SmolLM2-135M-Instruct), greedy, ``ignore_eos``:

* one stream: a ~20-token prompt, ``--new-tokens`` new tokens; decode tokens/s after the first token;
* ``--streams`` streams at once: 128-token prompts (random ids, fixed seed), ``--new-tokens`` each; summed
  decode tokens/s over the decode phase (from the last stream's first token to the end), as llama.cpp's
  ``llama-batched-bench`` counts its S_TG;
* prompt processing: a 512-token prompt, one new token; prompt tokens / time to first token;
* time to first token of a 500-token prompt on a cold cache.

gLLM runs in ``--gllm-dtype`` (default ``auto``: the fastest precision that passed ``quality.py``) and,
with ``--quantize int8``, also with int8 weights. With ``--llama-cpp DIR`` (a build holding
``llama-bench`` and ``llama-batched-bench``) the same workloads run in llama.cpp on the same GGUF file.
Every cell is the median of ``--repeats`` runs after a warm-up; the JSON keeps every run.

    python benchmarks/cpu_bench.py --threads 2                    # writes results/cpu_bench_t2.{json,md}
    python benchmarks/cpu_bench.py --threads 2 --llama-cpp ~/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, markdown_table, summarize, write_results  # noqa: E402
from engine_vs_hf import MODEL, SHORT_PROMPT, batch_prompts  # noqa: E402
from llama_cpp_bench import LlamaCppSystem  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("single_decode_tps", "multi_decode_tps", "prefill_tps", "ttft_500_ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: all cores)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams of the batched workload")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gllm-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantize", choices=["int8"], default=None, help="also run gLLM with these weights")
    p.add_argument("--hf", default="float32,bfloat16", help="HF dtypes to run, comma-separated ('' for none)")
    p.add_argument("--llama-cpp", metavar="DIR", default=None, help="folder with llama-bench and llama-batched-bench")
    p.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat: a smoke run")
    p.add_argument("--out", default=None, help="output path without suffix (default results/cpu_bench_tN)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.out = args.out or str(RESULTS / f"cpu_bench_t{args.threads}{'_quick' if args.quick else ''}")
    return args


class GLLM:
    """gLLM's engine, prefix caching off (every repeat recomputes its prompt)."""

    def __init__(self, dtype: str, quantize: str | None, max_batch: int):
        from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

        self.request = GenerationRequest
        params = GeneratorParams(max_batch_size=max_batch, max_seq_len=1024, enable_prefix_caching=False)
        self.engine = LLMEngine(MODEL, params, dtype=dtype, quantize=quantize)
        self.name = f"gLLM {str(self.engine.dtype).removeprefix('torch.')}" + (f" {quantize}" if quantize else "")

    def _run(self, prompts: list[list[int]], n: int) -> tuple[float, list[Any]]:
        reqs = [self.request(prompt_token_ids=p, max_new_tokens=n, temperature=0, ignore_eos=True) for p in prompts]
        start = time.perf_counter()
        results = self.engine.generate(reqs)
        return time.perf_counter() - start, results

    def decode(self, prompts: list[list[int]], n: int) -> float:
        wall, results = self._run(prompts, n)
        first = max(r.metrics["ttft_ms"] for r in results) / 1000
        return sum(len(r.token_ids) - 1 for r in results) / (wall - first)

    def ttft_ms(self, prompt: list[int]) -> float:
        _, (result,) = self._run([prompt], 1)
        return result.metrics["ttft_ms"]


class HF:
    """HF ``generate`` on the same GGUF; many streams run as one left-padded batch."""

    def __init__(self, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        from gllm.loader.registry import resolve

        path = resolve(MODEL)
        self.torch, self.name = torch, f"HF {dtype}"
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
        self.pad = self.model.generation_config.eos_token_id

    def _run(self, prompts: list[list[int]], n: int) -> list[float]:
        width = max(map(len, prompts))
        ids = self.torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        times: list[float] = []

        class Clock:  # a streamer that notes when the prompt, then each new token, comes out
            put = staticmethod(lambda value: times.append(time.perf_counter()))
            end = staticmethod(lambda: None)

        start = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=self.pad, streamer=Clock())
        return [start] + times[1:]  # start, then each step's tokens

    def decode(self, prompts: list[list[int]], n: int) -> float:
        times = self._run(prompts, n)
        return len(prompts) * (n - 1) / (times[-1] - times[1])

    def ttft_ms(self, prompt: list[int]) -> float:
        times = self._run([prompt], 1)
        return (times[1] - times[0]) * 1000


def measure(system: Any, short: list[int], streams: list[list[int]], long512: list[int], long500: list[int],
            args: argparse.Namespace) -> dict[str, Any]:
    """Every workload, warmed up once, then ``repeats`` times; medians and all runs."""
    n = args.new_tokens
    jobs = {
        "single_decode_tps": lambda: system.decode([short], n),
        "multi_decode_tps": lambda: system.decode(streams, n),
        "prefill_tps": lambda: len(long512) / (system.ttft_ms(long512) / 1000),
        "ttft_500_ms": lambda: system.ttft_ms(long500),
    }
    out = {}
    for key, job in jobs.items():
        job()
        runs = [job() for _ in range(args.repeats)]
        out[key] = summarize(runs, higher_is_better=key.endswith("tps"))
        print(f"  {system.name} {key}: {[round(r, 1) for r in runs]}", flush=True)
    return out


def table(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    labels = {
        "single_decode_tps": f"one stream, decode tok/s ({s['new_tokens']} new tokens)",
        "multi_decode_tps": f"{s['streams']} streams, decode tok/s summed (128-token prompts)",
        "prefill_tps": "prompt processing tok/s (512 tokens)",
        "ttft_500_ms": "time to first token, 500-token prompt, cold (ms)",
    }
    names = list(res["systems"])
    rows = [[label] + [f"{res['systems'][n][key]['median']:.1f}" if key in res["systems"][n] else "-" for n in names]
            for key, label in labels.items()]
    head = (f"# CPU speed: {res['model']}\n\n{m['cpu']}, {s['threads']} thread(s) of {m['usable_cores']} cores, "
            f"torch {m['torch']}, transformers {m['transformers']}. Median of {s['repeats']} runs after a warm-up; "
            f"greedy, ignore_eos. Load average before / after: {res['load_average']}.\n"
            f"Command: `python benchmarks/cpu_bench.py {' '.join(s['argv'])}`\n\n")
    return head + markdown_table(["workload"] + names, rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    systems: list[Any] = [GLLM(args.gllm_dtype, None, args.streams)]
    if args.quantize:
        systems.append(GLLM("bfloat16", args.quantize, args.streams))
    systems += [HF(d) for d in filter(None, args.hf.split(","))]
    tok = systems[0].engine.tokenizer
    vocab = systems[0].engine.config.vocab_size
    short = tok.encode(SHORT_PROMPT)
    streams = batch_prompts(args.streams, 128, 128, vocab, seed=0)
    long512, long500 = batch_prompts(1, 512, 512, vocab, 1)[0], batch_prompts(1, 500, 500, vocab, 2)[0]
    load_before = [round(x, 2) for x in os.getloadavg()]
    res: dict[str, Any] = {"benchmark": "cpu_bench", "model": MODEL, "machine": machine_info(), "systems": {},
                           "settings": {"threads": args.threads, "streams": args.streams, "new_tokens": args.new_tokens,
                                        "repeats": args.repeats, "argv": sys.argv[1:] if argv is None else argv}}
    for system in systems:
        res["systems"][system.name] = measure(system, short, streams, long512, long500, args)
    if args.llama_cpp:
        cpp = LlamaCppSystem(Path(args.llama_cpp), args.threads)
        res["systems"][cpp.name] = cpp.measure(args.streams, args.new_tokens, args.repeats)
    res["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    md = table(res)
    json_path, md_path = write_results(args.out, res, md)
    print("\n" + md + f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
