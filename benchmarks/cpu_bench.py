"""The CPU speed table, per model: gLLM, HF ``transformers`` and llama.cpp on the same GGUF file, one run.

Workloads (greedy, ``ignore_eos``, every stream exactly ``--new-tokens`` tokens):

* one stream: a ~20-token prompt; decode tokens/s after the first token;
* ``--streams`` streams at once: 128-token prompts (random ids, fixed seed); summed decode tokens/s over
  the decode phase (from the last stream's first token to the end), as ``llama-batched-bench`` counts S_TG;
* prompt processing: a 256- and a 512-token prompt, one new token; prompt tokens / time to first token;
* time to first token of a 500-token prompt on a cold cache (``--workloads`` picks among these five);
* memory: resident set (``VmRSS``) after the engine is built, and its peak (``VmHWM``) over loading and
  over the whole run, read from ``/proc``;
* start-up: building the engine in a fresh process with an empty cache folder (cold: the GGUF index and
  tokenizer are parsed and converted, the CPU kernels compiled) and again with that folder (warm).

Each system and model runs in a process of its own, so that memory figures are its alone. ``--model``
(repeatable) takes a registered name or a GGUF path (``make_gguf.py`` writes real shapes with random
weights). gLLM runs in ``--gllm-dtype`` (default ``auto``) and, with ``--quantize int8``, also with int8
weights; HF runs in the ``--hf`` dtypes. With ``--llama-cpp DIR`` (a build with ``llama-bench`` and
``llama-batched-bench``) llama.cpp runs the same workloads on the same file with the same threads
(``llama_cpp_bench.py``). Every speed is the median of ``--repeats`` runs after a warm-up.

    python benchmarks/cpu_bench.py --threads 2                    # writes results/cpu_bench_t2.{json,md}
    python benchmarks/cpu_bench.py --threads 2 --model smollm2-1.7b-q4_k_m.gguf --hf '' --llama-cpp DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]  # this checkout's gllm, not an installed one

from common import cpu_model, markdown_table, summarize, write_results  # noqa: E402

RESULTS = BENCHMARKS / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"
PROMPT_LENGTHS = (256, 512)
SPEEDS = ("single_decode_tps", "multi_decode_tps", "prefill_256_tps", "prefill_512_tps", "ttft_500_ms")
LABELS = {
    "single_decode_tps": "one stream, decode tok/s",
    "multi_decode_tps": "{streams} streams, decode tok/s summed (128-token prompts)",
    "prefill_256_tps": "prompt processing tok/s (256 tokens)",
    "prefill_512_tps": "prompt processing tok/s (512 tokens)",
    "ttft_500_ms": "time to first token, 500-token prompt, cold (ms)",
    "rss_after_load_mb": "resident memory after load (MB)",
    "peak_load_mb": "peak resident memory while loading (MB)",
    "peak_run_mb": "peak resident memory, load and all runs (MB)",
    "startup_cold_s": "start-up, empty cache (s)",
    "startup_warm_s": "start-up, cached index and tokenizer (s)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help=f"registered name or GGUF path, repeatable (default {DEFAULT_MODEL})")
    p.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: all cores)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams of the batched workload")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=1024, help="gLLM's context per stream (sizes its KV cache)")
    p.add_argument("--gllm-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantize", choices=["int8"], default=None, help="also run gLLM with these weights")
    p.add_argument("--hf", default="float32,bfloat16", help="HF dtypes to run, comma-separated ('' for none)")
    p.add_argument("--llama-cpp", metavar="DIR", default=None, help="folder with llama-bench and llama-batched-bench")
    p.add_argument("--workloads", default=",".join(SPEEDS),
                   help="speed rows to measure, comma-separated (default all): a large model on a small or busy "
                        "machine can leave out the long ones")  # fmt: skip
    p.add_argument("--no-startup", action="store_true", help="skip the start-up rows (two extra loads per model)")
    p.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat: a smoke run")
    p.add_argument("--out", default=None, help="output path without suffix (default results/cpu_bench[_MODEL]_tN)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one system in a child process
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if unknown := set(args.workloads) - set(SPEEDS):
        p.error(f"--workloads: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SPEEDS)})")
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    if args.max_seq_len <= max(PROMPT_LENGTHS):
        p.error(f"--max-seq-len must leave room after the longest prompt ({max(PROMPT_LENGTHS)} tokens)")
    args.model = args.model or [DEFAULT_MODEL]
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.out is None:
        names = "" if args.model == [DEFAULT_MODEL] else "_" + "+".join(model_label(m) for m in args.model)
        args.out = str(RESULTS / f"cpu_bench{names}_t{args.threads}{'_quick' if args.quick else ''}")
    return args


def model_label(model: str) -> str:
    return Path(model).stem if model.endswith(".gguf") else model


def memory_mb() -> dict[str, float]:
    """This process's resident set now and at its peak, in MB (``/proc/self/status``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


# ----------------------------------------------------------------------- the systems, one per child process
class GLLM:
    """gLLM's engine, prefix caching off (every repeat recomputes its prompt)."""

    def __init__(self, model: str, dtype: str, quantize: str | None, args: argparse.Namespace):
        from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

        self.request = GenerationRequest
        params = GeneratorParams(max_batch_size=args.streams, max_seq_len=args.max_seq_len, enable_prefix_caching=False)
        self.engine = LLMEngine(model, params, dtype=dtype, quantize=quantize)
        self.name = f"gLLM {str(self.engine.dtype).removeprefix('torch.')}" + (f" {quantize}" if quantize else "")
        self.tokenizer, self.vocab = self.engine.tokenizer, self.engine.config.vocab_size

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

    def __init__(self, model: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gllm.loader.registry import is_registered, resolve

        path = resolve(model) if is_registered(model) else Path(model)
        self.torch, self.name = torch, f"HF {dtype}"
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.vocab = self.model.config.vocab_size
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


def measure(system: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every speed workload, warmed up once, then ``repeats`` times; medians and all runs."""
    from engine_vs_hf import SHORT_PROMPT, batch_prompts

    n, vocab = args.new_tokens, system.vocab
    short = system.tokenizer.encode(SHORT_PROMPT)
    streams = batch_prompts(args.streams, 128, 128, vocab, seed=0)
    long = {length: batch_prompts(1, length, length, vocab, seed)[0] for seed, length in enumerate(PROMPT_LENGTHS, 1)}
    long500 = batch_prompts(1, 500, 500, vocab, 9)[0]
    jobs = {
        "single_decode_tps": lambda: system.decode([short], n),
        "multi_decode_tps": lambda: system.decode(streams, n),
        **{f"prefill_{k}_tps": (lambda p=p: len(p) / (system.ttft_ms(p) / 1000)) for k, p in long.items()},
        "ttft_500_ms": lambda: system.ttft_ms(long500),
    }
    out = {}
    for key, job in ((k, jobs[k]) for k in args.workloads):
        job()
        runs = [job() for _ in range(args.repeats)]
        out[key] = summarize(runs, higher_is_better=key.endswith("tps"))
        print(f"  {system.name} {key}: {[round(r, 1) for r in runs]}", file=sys.stderr, flush=True)
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run in a child process: load one system (``gllm:DTYPE[:QUANTIZE]``, ``hf:DTYPE`` or ``load:MODEL``)
    and return its figures."""
    import torch

    torch.set_num_threads(args.threads)
    kind, _, rest = args.worker.partition(":")
    model = args.model[0]
    start = time.perf_counter()
    if kind == "load":  # start-up only, in ``load:DTYPE``
        from gllm.engine import GeneratorParams, LLMEngine

        LLMEngine(model, GeneratorParams(max_batch_size=args.streams, max_seq_len=args.max_seq_len), dtype=rest or "auto")
        return {"seconds": time.perf_counter() - start}
    if kind == "gllm":
        dtype, _, quantize = rest.partition(":")
        system: Any = GLLM(model, dtype, quantize or None, args)
    else:
        system = HF(model, rest)
    loaded = memory_mb()
    out = measure(system, args)
    out["rss_after_load_mb"] = summarize([loaded["VmRSS"]])
    out["peak_load_mb"] = summarize([loaded["VmHWM"]])
    out["peak_run_mb"] = summarize([memory_mb()["VmHWM"]])
    return {"name": system.name, "load_s": time.perf_counter() - start, "results": out}


def run_worker(args: argparse.Namespace, model: str, system: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One system on one model in a fresh Python process; its last stdout line is its JSON."""
    argv = [sys.executable, __file__, "--worker", system, "--model", model, "--threads", str(args.threads),
            "--streams", str(args.streams), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--max-seq-len", str(args.max_seq_len), "--workloads", ",".join(args.workloads)]  # fmt: skip
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def startup(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Engine construction in fresh processes: with an empty cache folder, then with that folder."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GLLM_CACHE_DIR=cache)
        cold = run_worker(args, model, f"load:{args.gllm_dtype}", env)["seconds"]
        warm = [run_worker(args, model, f"load:{args.gllm_dtype}", env)["seconds"] for _ in range(args.repeats)]
    print(f"  start-up cold {cold:.2f} s, warm {[round(w, 2) for w in warm]}", file=sys.stderr, flush=True)
    return {"startup_cold_s": summarize([cold]), "startup_warm_s": summarize(warm)}


def bench_model(args: argparse.Namespace, model: str) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    names = [f"gllm:{args.gllm_dtype}"] + ([f"gllm:bfloat16:{args.quantize}"] if args.quantize else [])
    for i, name in enumerate(names + [f"hf:{d}" for d in filter(None, args.hf.split(","))]):
        got = run_worker(args, model, name)
        systems[got["name"]] = got["results"]
        if i == 0 and not args.no_startup:
            systems[got["name"]].update(startup(args, model))
    if args.llama_cpp:
        from llama_cpp_bench import LlamaCppSystem

        from gllm.loader.registry import is_registered, resolve

        path = resolve(model) if is_registered(model) else Path(model)
        cpp = LlamaCppSystem(Path(args.llama_cpp), path, args.threads)
        systems[cpp.name] = cpp.measure(args.workloads, args.streams, args.new_tokens, args.repeats, args.max_seq_len)
    return systems


def table(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    parts = [f"# CPU speed\n\n{m['cpu']}, {s['threads']} thread(s) of {m['usable_cores']} cores, "
             f"torch {m['torch']}, transformers {m['transformers']}, {res['written_on']}. Median of "
             f"{s['repeats']} runs after a warm-up; greedy, ignore_eos, {s['new_tokens']} new tokens per stream; "
             f"gLLM's context {s['max_seq_len']} tokens per stream. Load average before / after: {res['load_average']}.\n"
             f"Command: `python benchmarks/cpu_bench.py {' '.join(s['argv'])}`"]  # fmt: skip
    for model, systems in res["models"].items():
        names = list(systems)
        rows = [[label.format(**s)] + [f"{systems[n][key]['median']:.1f}" if key in systems[n] else "-" for n in names]
                for key, label in LABELS.items()]  # fmt: skip
        parts.append(f"## {model}\n\n" + markdown_table(["workload"] + names, rows))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from common import machine_info

    load_before = [round(x, 2) for x in os.getloadavg()]
    info = machine_info()
    res: dict[str, Any] = {"benchmark": "cpu_bench", "machine": info, "written_on": time.strftime("%Y-%m-%d"), "models": {},
                           "settings": {"threads": args.threads, "streams": args.streams, "new_tokens": args.new_tokens,
                                        "repeats": args.repeats, "max_seq_len": args.max_seq_len,
                                        "argv": sys.argv[1:] if argv is None else argv}}  # fmt: skip
    for model in args.model:
        print(f"{model} ({cpu_model()}, {args.threads} threads)", file=sys.stderr, flush=True)
        res["models"][model] = bench_model(args, model)
    res["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    md = table(res)
    json_path, md_path = write_results(args.out, res, md)
    print("\n" + md + f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
