"""Where the time of one stream's decode step goes on the CPU: the engine's phases, and the host's share.

A small model's single stream is bound by per-step work, not by its weights: at 576 hidden units the
matrix products of SmolLM2-135M are a few milliseconds, and everything around them (scheduling, packing
the batch, some 300 kernel calls from Python, sampling, detokenizing) is paid again every token. This
runs the real engine on one stream (greedy, ``ignore_eos``), times every step and the phases of
``LLMEngine.step`` inside it (schedule, prepare the batch, the model's forward, sampling, the
scheduler's update and the request's output), and with ``--profile`` lists the operators that
``torch.profiler`` sees inside the forward. ``--stub-products`` replaces every matrix product with a
function that returns zeros of its output's shape: what is left of a step is the host's work and the
small kernels around the products, whatever the weights cost on this machine. ``--clock cpu`` times
with the thread's CPU time instead of the wall clock: with ``--threads 1`` every kernel runs on this
thread, so the figures then hold on a machine whose other work keeps descheduling this process. Medians over ``--steps`` steps after a warm-up, in
``--repeats`` rounds (the table shows the median round by step time).

    python benchmarks/cpu_step.py [--model NAME] [--threads 2] [--steps 64] [--profile]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]  # this checkout's gllm, not an installed one
from common import machine_info, markdown_table, write_results  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sample", "update", "output")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCKS["wall"]


def timed(spent: dict[str, float], phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that adds its time to ``spent[phase]``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += clock() - start

    return wrapper


def instrument(engine: Any, spent: dict[str, float]) -> None:
    """Wrap the phases of ``engine.step`` (on this engine's objects; ``output`` and the wait for samples
    on their classes)."""
    from gllm.engine.jobs import GenerationJob
    from gllm.sample.sampler import PendingSample

    engine.scheduler.schedule = timed(spent, "schedule", engine.scheduler.schedule)
    engine.runner.prepare = timed(spent, "prepare", engine.runner.prepare)
    engine.model.forward = timed(spent, "forward", engine.model.forward)
    engine.sampler.launch = timed(spent, "sample", engine.sampler.launch)
    PendingSample.result = timed(spent, "sample", PendingSample.result)
    engine.scheduler.update = timed(spent, "update", engine.scheduler.update)
    GenerationJob.on_token = timed(spent, "output", GenerationJob.on_token)


def stub_products(model: Any) -> None:
    """Make every matrix product of ``model`` (a ``LlamaModel``) return zeros of its output's shape."""
    from gllm.model.llama import Linear

    def zeros(out_features: int) -> Callable[[Any], Any]:
        return lambda x: x.new_zeros(*x.shape[:-1], out_features)

    for module in model.modules():
        if isinstance(module, Linear):
            module.kernel = zeros(module.out_features)
    model.head_kernel = zeros(model.config.vocab_size)


def one_round(engine: Any, steps: int, request: Any) -> list[dict[str, float]]:
    """Per-step timings (ms) of ``steps`` decode steps of one stream, after its prompt and a warm-up."""
    spent: dict[str, float] = defaultdict(float)
    instrument(engine, spent)
    engine.add_request(request)
    for _ in range(8):  # the prompt, then a few decodes
        engine.step()
    rows = []
    for _ in range(steps):
        spent.clear()
        start = clock()
        engine.step()
        row = {"step": (clock() - start) * 1000, **{p: spent[p] * 1000 for p in PHASES}}
        row["other"] = row["step"] - sum(row[p] for p in PHASES)
        rows.append(row)
    while engine.has_work():
        engine.step()
    return rows


def profile_forward(engine: Any, request: Any, steps: int) -> str:
    """``torch.profiler``'s operator table over ``steps`` decode steps (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    engine.add_request(request)
    for _ in range(8):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_work():
        engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: this thread's CPU time")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stub-products", action="store_true", help="matrix products return zeros (host work only)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's operator table")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_step"))
    args = p.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    import torch

    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    torch.set_num_threads(args.threads)
    engine = LLMEngine(args.model, GeneratorParams(max_batch_size=1, max_seq_len=512), dtype=args.dtype)
    if args.stub_products:
        stub_products(engine.model)
    prompt = engine.tokenizer.encode("Tell the traveller about the old mill by the river, in a few sentences.")
    request = lambda: GenerationRequest(prompt_token_ids=prompt, max_new_tokens=args.steps + 16,  # noqa: E731
                                        temperature=0, ignore_eos=True)  # fmt: skip
    rounds = []
    for _ in range(args.repeats):
        rows = one_round(engine, args.steps, request())
        rounds.append({k: statistics.median(r[k] for r in rows) for k in rows[0]})
        print({k: round(v, 3) for k, v in rounds[-1].items()}, flush=True)
    typical = sorted(rounds, key=lambda r: r["step"])[len(rounds) // 2]
    info = machine_info()
    table = markdown_table(["phase", "ms per step (median)", "share"],
                           [[k, f"{v:.3f}", f"{v / typical['step']:.0%}"] for k, v in typical.items()])  # fmt: skip
    md = (f"# One stream's decode step on the CPU, by phase\n\n{info['cpu']}, {args.threads} threads, torch "
          f"{info['torch']}, model {args.model}, dtype {engine.dtype}, backend {engine.attention.name}"
          f"{', matrix products stubbed (zeros)' if args.stub_products else ''}, {args.clock} clock. "
          f"Medians of {args.steps} steps; the median of {args.repeats} rounds by step time "
          f"({1000 / typical['step']:.1f} tok/s).\nCommand: `python benchmarks/cpu_step.py {' '.join(sys.argv[1:])}`\n\n"
          + table)  # fmt: skip
    if args.profile:
        ops = profile_forward(engine, request(), args.steps)
        md += f"\n\n`torch.profiler`, {args.steps} steps:\n\n```\n{ops}\n```"
    write_results(args.out, {"machine": info, "settings": vars(args), "rounds": rounds, "typical": typical}, md)
    print(md)


if __name__ == "__main__":
    main()
