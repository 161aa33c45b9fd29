"""What the runtime costs: tokens/s through ``gllm serve`` + the Python client vs the engine in-process,
and the latency the runtime adds to each token.

Why: a game talks to the model through the runtime, so the runtime must not eat the batching engine's
throughput (goal: at most 5% lost at 16 concurrent streams) nor add noticeable delay per token.

Workload: ``--streams`` requests (default 16) of ``--prompt-len`` random token ids each, greedy, exactly
``--new-tokens`` new tokens per stream (``ignore_eos``), all submitted at once; prefix caching off so every
run recomputes its prompts.

* **in-process**: ``LLMEngine.add_request`` for every stream, then ``step()`` until all have finished;
  tokens/s = generated tokens / wall time from the first ``add_request`` to the last step.
* **runtime**: the same engine settings in a ``gllm serve``-equivalent subprocess (this script with
  ``--serve-traced``: the real ``Server`` class, its engine's ``step`` wrapped to record when each token
  left the engine). One ``AsyncClient`` opens all streams at once over one connection; tokens/s =
  generated tokens / wall time from the first send to the last ``done`` at the client.
* **added latency per token**: the moment the client's ``async for`` yields a token minus the moment the
  server's ``engine.step()`` returned it (both ``time.perf_counter``, i.e. ``CLOCK_MONOTONIC``, shared by
  all processes of a Linux machine). It covers the server's own work after the step (building, encoding
  and sending every message of that step), ZeroMQ transport and the client's decoding and routing.
* **server loop share**: within each runtime run, the time the server spends between one engine step's
  end and the next one's start (taking messages, building and sending replies), as a share of its time.
  Whole-run tokens/s on a machine shared with other work swings by tens of percent from run to run;
  this share is the runtime's own cost and hardly moves with that noise.

Runs alternate between the two systems after one short warm-up of each; the table shows medians, the
JSON every run. The client process competes with the server's torch threads for the CPU cores, as a
game on the same machine would.

    python benchmarks/runtime_overhead.py              # writes benchmarks/results/runtime_overhead.{json,md}
    python benchmarks/runtime_overhead.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this file, run as a script

from common import machine_info, markdown_table, summarize, write_results  # noqa: E402

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="per stream (default 64; 16 with --quick)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per system (default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in both processes (default: torch's choice); on a busy shared "
                        "machine 1 avoids oversubscribed OpenMP barriers that swamp the difference measured")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="output path without suffix (default results/runtime_overhead[_quick])")
    p.add_argument("--serve-traced", action="store_true", help=argparse.SUPPRESS)  # the server subprocess
    p.add_argument("--bind", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trace", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.out = args.out or str(RESULTS / ("runtime_overhead_quick" if args.quick else "runtime_overhead"))
    return args


def make_engine(args: argparse.Namespace):
    import torch

    from gllm.engine import GeneratorParams, LLMEngine

    if args.threads:
        torch.set_num_threads(args.threads)

    params = GeneratorParams(max_batch_size=args.streams, max_seq_len=args.prompt_len + args.new_tokens + 1,
                             enable_prefix_caching=False)
    return LLMEngine(args.model, params, device=args.device, dtype=getattr(torch, args.dtype))


def workload(args: argparse.Namespace, vocab: int, run: int) -> list[tuple[list[int], int]]:
    """(prompt ids, seed) per stream; the seed tells the streams apart in the server's trace."""
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(args.streams)]
    return [(p, run * 1000 + i) for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------- in-process
def run_in_process(engine, streams: list[tuple[list[int], int]], new_tokens: int) -> dict[str, float]:
    from gllm.engine import GenerationRequest

    start = time.perf_counter()
    for ids, seed in streams:
        engine.add_request(GenerationRequest(prompt_token_ids=ids, max_new_tokens=new_tokens, temperature=0.0,
                                             ignore_eos=True, seed=seed))
    tokens = finished = 0
    while finished < len(streams):
        out = engine.step()
        tokens += len(out.deltas)
        finished += len(out.finished)
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


# -------------------------------------------------------------------------------------------- runtime
async def _run_client(endpoint: str, streams: list[tuple[list[int], int]], new_tokens: int):
    from gllm.client import AsyncClient

    arrivals: dict[tuple[int, int], float] = {}
    async with AsyncClient(endpoint, timeout=600) as client:
        async def one(ids: list[int], seed: int) -> None:
            stream = client.generate(prompt_token_ids=ids, max_tokens=new_tokens, temperature=0, ignore_eos=True,
                                     seed=seed)
            async for token in stream:
                arrivals[(seed, token.index)] = time.perf_counter()

        start = time.perf_counter()
        await asyncio.gather(*(one(ids, seed) for ids, seed in streams))
        end = time.perf_counter()
    stats = {"tokens": len(arrivals), "wall_s": end - start, "tokens_per_s": len(arrivals) / (end - start),
             "window": [start, end]}
    return stats, arrivals


def run_through_runtime(endpoint: str, streams, new_tokens: int):
    return asyncio.run(_run_client(endpoint, streams, new_tokens))


def serve_traced(args: argparse.Namespace) -> int:
    """The server subprocess: the real ``Server``, with the engine's token hand-off times recorded."""
    from gllm.runtime.server import Server

    engine = make_engine(args)
    step, add_request = engine.step, engine.add_request
    seed_of: dict[str, int] = {}
    tokens: list[tuple[int, int, float]] = []  # (seed, index, when the step returned it)
    steps: list[tuple[float, float]] = []  # (start, end) of every step

    def traced_step():
        start = time.perf_counter()
        out = step()
        now = time.perf_counter()
        steps.append((start, now))
        tokens.extend((seed_of[d.request_id], d.index, now) for d in out.deltas)
        return out

    def traced_add_request(req):
        request_id = add_request(req)
        seed_of[request_id] = req.seed
        return request_id

    engine.step, engine.add_request = traced_step, traced_add_request
    server = Server(engine, args.bind)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.run()
    Path(args.trace).write_text(json.dumps({"tokens": tokens, "steps": steps}))
    return 0


def start_traced_server(args: argparse.Namespace, endpoint: str, trace: Path) -> subprocess.Popen:
    from gllm.client import Client

    cmd = [sys.executable, __file__, "--serve-traced", "--bind", endpoint, "--trace", str(trace),
           "--model", args.model, "--dtype", args.dtype, "--device", args.device, "--streams", str(args.streams),
           "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
           *(["--threads", str(args.threads)] if args.threads else [])]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with Client(endpoint, timeout=2) as client:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                client.ping()
                return proc
            except TimeoutError:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit("the server did not answer within 600 s") from None


# ---------------------------------------------------------------------------------------------- main
def server_loop_share(steps: list[list[float]], start: float, end: float) -> float:
    """Share of the server's time between consecutive engine steps during one client run: what the runtime
    itself spends per step (taking messages, building and sending replies), free of the CPU noise that
    other processes add to whole-run throughput."""
    inside = [(a, b) for a, b in steps if start <= a and b <= end]
    busy = sum(b - a for a, b in inside)
    gaps = sum(nxt[0] - cur[1] for cur, nxt in zip(inside, inside[1:]))
    return gaps / (busy + gaps) if inside else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_traced:
        return serve_traced(args)
    workdir = Path(tempfile.mkdtemp(prefix="gllm-bench-"))
    endpoint, trace_path = f"ipc://{workdir}/gllm.sock", workdir / "trace.json"
    print(f"starting the runtime ({args.model}, {args.dtype}, {args.device}) on {endpoint} ...", flush=True)
    server = start_traced_server(args, endpoint, trace_path)
    try:
        engine = make_engine(args)
        vocab = engine.config.vocab_size
        run_in_process(engine, workload(args, vocab, 0)[:2], 4)  # warm-ups
        run_through_runtime(endpoint, workload(args, vocab, 1)[:2], 4)
        in_process, runtime, arrivals = [], [], {}
        for r in range(args.repeats):
            in_process.append(run_in_process(engine, workload(args, vocab, 2 + 2 * r), args.new_tokens))
            stats, got = run_through_runtime(endpoint, workload(args, vocab, 3 + 2 * r), args.new_tokens)
            runtime.append(stats)
            arrivals.update(got)
            print(f"run {r + 1}/{args.repeats}: in-process {in_process[-1]['tokens_per_s']:.1f} tok/s, "
                  f"runtime {runtime[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    trace = json.loads(trace_path.read_text())
    left = {(seed, index): t for seed, index, t in trace["tokens"]}
    for run in runtime:
        run["server_loop_share"] = server_loop_share(trace["steps"], *run.pop("window"))
    added_ms = [(t - left[key]) * 1000 for key, t in arrivals.items() if key in left]
    ip = statistics.median(r["tokens_per_s"] for r in in_process)
    rt = statistics.median(r["tokens_per_s"] for r in runtime)
    latency = {"p50": percentile(added_ms, 50), "p99": percentile(added_ms, 99), "mean": statistics.mean(added_ms),
               "max": max(added_ms), "samples": len(added_ms)}
    data: dict[str, Any] = {
        "machine": machine_info(("torch", "pyzmq", "msgpack")),
        "settings": {k: v for k, v in vars(args).items() if k not in ("serve_traced", "bind", "trace")},
        "command": " ".join(sys.argv),
        "in_process": {"tokens_per_s": summarize([r["tokens_per_s"] for r in in_process]), "runs": in_process},
        "runtime": {"tokens_per_s": summarize([r["tokens_per_s"] for r in runtime]), "runs": runtime},
        "throughput_lost_percent": 100 * (1 - rt / ip),
        "server_loop_percent": 100 * statistics.median(r["server_loop_share"] for r in runtime),
        "added_latency_ms": latency,
    }
    rows = [["in-process engine", f"{ip:.1f}", "-", "-"],
            ["runtime + Python client", f"{rt:.1f}", f"{latency['p50']:.2f}", f"{latency['p99']:.2f}"]]
    md = (f"# Runtime overhead\n\n{args.model}, {args.dtype}, {args.device}; {args.streams} concurrent greedy streams "
          f"of {args.new_tokens} new tokens after {args.prompt_len}-token prompts; median of {args.repeats} runs "
          f"each, alternating. CPU: {data['machine']['cpu']} ({data['machine']['usable_cores']} usable cores), "
          f"torch threads per process: {data['machine']['torch_threads']}.\n\n"
          + markdown_table(["system", "tokens/s", "added latency p50 (ms)", "added latency p99 (ms)"], rows)
          + f"\n\nThroughput lost through the runtime: {data['throughput_lost_percent']:.1f}% (goal: at most 5%; "
          f"whole-run rates on a shared machine are noisy, see every run in the JSON). Time the server spends "
          f"between engine steps (its own per-step work): {data['server_loop_percent']:.2f}% of its busy time. "
          f"Added latency: {latency['samples']} tokens, mean {latency['mean']:.2f} ms, max {latency['max']:.2f} ms.\n")
    json_path, md_path = write_results(args.out, data, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
