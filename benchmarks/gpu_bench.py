"""GPU throughput: this engine vs HF `generate` on the same GPU, random weights of real model shapes.

Each workload: B concurrent requests, 128-token prompts, 128 new tokens each (greedy, EOS ignored).
Reports generated tokens per second over the whole run (prefill included) and, for B = 1, the decode
rate after the first token. Writes JSON and a markdown table into --out (a folder).

    python benchmarks/gpu_bench.py --out results/   # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import transformers

from gllm.config import ModelConfig
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.loader import LoadedModel
from gllm.sample.sampler import PendingSample

SHAPES = {
    "llama-3.2-1b-shape": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "smollm2-135m-shape": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
}  # fmt: skip


DEVICE = "cuda"


def build(shape: str, dtype: torch.dtype) -> tuple[transformers.LlamaForCausalLM, LoadedModel]:
    cfg = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    weights = dict(hf.state_dict())
    return hf, LoadedModel(shape, ModelConfig.from_hf_dict(cfg.to_dict()), weights, None)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_engine(engine: LLMEngine, prompts: list[list[int]], new: int) -> dict:
    reqs = lambda: [GenerationRequest(prompt_token_ids=p, max_new_tokens=new, temperature=0, ignore_eos=True) for p in prompts]  # noqa: E731
    engine.generate(reqs()[: min(4, len(prompts))])  # warm-up
    results = []
    with gc_pauses() as pauses:
        seconds = timed(lambda: results.extend(engine.generate(reqs())))
    out = {"seconds": seconds, "tok_per_s": len(prompts) * new / seconds, "overlap": engine.overlap,
           "last_first_token_ms": max(r.metrics["ttft_ms"] for r in results),  # where the prompts' phase ends
           "gc_pauses_ms": pauses}
    if len(prompts) == 1:
        m = results[0].metrics
        out["decode_tok_per_s"] = (new - 1) / ((m["total_ms"] - m["ttft_ms"]) / 1000)
        out["ttft_ms"] = m["ttft_ms"]
    return out


@contextlib.contextmanager
def gc_pauses():
    """Python's garbage collections of generations 1 and 2 inside the block: a list of their ms."""
    pauses, started = [], []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif info["generation"] > 0 and started:
            pauses.append(round((time.perf_counter() - started[0]) * 1000, 2))

    gc.callbacks.append(note)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(note)


def run_without_overlap(engine: LLMEngine, prompts: list[list[int]], new: int) -> dict:
    before, engine.overlap = engine.overlap, False
    try:
        return run_engine(engine, prompts, new)
    finally:
        engine.overlap = before


def run_hf(hf, prompts: list[list[int]], new: int) -> dict:
    ids = torch.tensor(prompts, device=DEVICE)
    gen = lambda x: hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)  # noqa: E731
    gen(ids[:1, :8])  # warm-up
    seconds = timed(lambda: gen(ids))
    return {"seconds": seconds, "tok_per_s": len(prompts) * new / seconds}


def profile_decode(engine: LLMEngine, prompt_len: int, out: Path) -> None:
    """Where one stream's decode step spends its time: the top operations, host and device."""
    prompt = list(range(1, prompt_len + 1))
    engine.generate([GenerationRequest(prompt_token_ids=prompt, max_new_tokens=8, temperature=0, ignore_eos=True)])
    engine.add_request(GenerationRequest(prompt_token_ids=prompt, max_new_tokens=40, temperature=0, ignore_eos=True))
    for _ in range(5):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
    while engine.has_work():
        engine.step()
    out.write_text(op_tables(prof))


def op_tables(prof) -> str:
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    if DEVICE == "cuda":
        table += "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    return table


def profile_batch(engine: LLMEngine, batch: int, prompt_len: int, vocab: int, out: Path) -> None:
    """Where ``batch`` concurrent requests spend their time: the prompt phase (until every prompt is
    computed), then 10 decode steps. Two passes over fresh prompts: the first times each step without the
    profiler (whose own overhead grows with the batch), the second lists the top operations of each phase."""
    gen = torch.Generator().manual_seed(2)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])

    def prompting(steps: int) -> bool:
        return bool(engine.scheduler.waiting or engine._inbox or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running))

    waited = [0.0]  # host time spent waiting for samples: near 0 means the host, not the GPU, sets the pace
    plain_result = PendingSample.result

    def timed_result(self: PendingSample):
        start = time.perf_counter()
        if self._event is not None:
            self._event.synchronize()
        waited[0] += time.perf_counter() - start
        return plain_result(self)

    phases = []
    PendingSample.result = timed_result
    for profiled in (False, True):
        for p in torch.randint(0, vocab, (batch, prompt_len), generator=gen).tolist():
            engine.add_request(GenerationRequest(prompt_token_ids=p, max_new_tokens=24, temperature=0, ignore_eos=True))
        for name, go_on in (("prompt phase", prompting), ("10 decode steps", lambda steps: steps < 10)):
            walls, waited[0] = [], 0.0
            with torch.profiler.profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
                while go_on(len(walls)) and engine.has_work():
                    start = time.perf_counter()
                    engine.step()  # no sync: an overlapped step's wait for its samples is in its time
                    walls.append(round((time.perf_counter() - start) * 1000, 2))
            head = (f"## {name}{' (profiled)' if profiled else ''}: {len(walls)} steps, {sum(walls):.1f} ms "
                    f"({waited[0] * 1000:.1f} ms of it waiting for samples); ms per step: {walls}")
            phases.append(head + (f"\n\n{op_tables(prof)}" if profiled else ""))
        while engine.has_work():
            engine.step()
    PendingSample.result = plain_result
    out.write_text(f"{batch} requests, {prompt_len}-token prompts, token budget {engine.params.token_budget}\n\n"
                   + "\n\n".join(phases))


def make_engine(loaded: LoadedModel, max_batch: int, max_seq_len: int, budget: int) -> LLMEngine:
    params = GeneratorParams(block_size=16, max_batch_size=max_batch, max_seq_len=max_seq_len, max_num_batched_tokens=budget)
    return LLMEngine(loaded, params, device=DEVICE, dtype=torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--budgets", default="8192,16384",
                   help="token budgets of a step: the first for every row, the others for an extra row at the largest batch")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "dtype": "bfloat16", "date": time.strftime("%Y-%m-%d"),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "token_budget": budgets[0], "results": [],
    }  # fmt: skip
    for shape in args.shapes.split(","):
        hf, loaded = build(shape, torch.bfloat16)
        engine = make_engine(loaded, max(batches), args.prompt_len + args.new_tokens + 16, budgets[0])
        gc.collect()
        gc.freeze()  # as `gllm serve` does: full collections no longer walk the start-up objects
        if shape == "llama-3.2-1b-shape":
            try:
                profile_decode(engine, args.prompt_len, args.out / "profile_decode_b1.txt")
                big = max(batches)
                profile_batch(engine, big, args.prompt_len, loaded.config.vocab_size, args.out / f"profile_b{big}.txt")
            except Exception:
                traceback.print_exc()
        gen = torch.Generator().manual_seed(1)
        for b in batches:
            prompts = torch.randint(0, loaded.config.vocab_size, (b, args.prompt_len), generator=gen).tolist()
            row = {"model": shape, "batch": b}
            runs = [("gllm", lambda: run_engine(engine, prompts, args.new_tokens)),
                    ("hf", lambda: run_hf(hf, prompts, args.new_tokens))]
            if shape == "llama-3.2-1b-shape" and b in (1, max(batches)):  # what overlapped decoding buys
                # fresh prompts: the ones above are in the prefix cache now and would skip their prefill
                fresh = torch.randint(0, loaded.config.vocab_size, (b, args.prompt_len), generator=gen).tolist()
                runs.append(("gllm_no_overlap", lambda: run_without_overlap(engine, fresh, args.new_tokens)))
            for name, fn in runs:
                try:
                    row[name] = fn()
                except Exception as exc:  # one failure must not lose the other measurements
                    row[name] = {"error": repr(exc)}
                    traceback.print_exc()
            print(json.dumps(row), flush=True)
            report["results"].append(row)
            write(report, args.out)  # after every row: a run cut short keeps what it measured
        if shape == "llama-3.2-1b-shape":
            for budget in budgets[1:]:  # the same largest batch with a larger step: fewer steps for the prompts
                del engine
                engine = make_engine(loaded, max(batches), args.prompt_len + args.new_tokens + 16, budget)
                prompts = torch.randint(0, loaded.config.vocab_size, (max(batches), args.prompt_len), generator=gen).tolist()
                row = {"model": shape, "batch": max(batches), "token_budget": budget}
                try:
                    row["gllm"] = run_engine(engine, prompts, args.new_tokens)
                except Exception as exc:
                    row["gllm"] = {"error": repr(exc)}
                    traceback.print_exc()
                print(json.dumps(row), flush=True)
                report["results"].append(row)
                write(report, args.out)
        gc.unfreeze()
        del hf, engine, loaded
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(markdown(report))


def write(report: dict, out: Path) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_bench.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"{report['device']}, torch {report['torch']}, bf16, {report['prompt_len']}-token prompts, "
        f"{report['new_tokens']} new tokens, greedy, EOS ignored, token budget {report.get('token_budget', 8192):,} "
        f"a step unless a row says otherwise; {report['date']}",
        "",
        "| model | batch | gLLM tok/s | HF generate tok/s | gLLM / HF | gLLM / HF at its best batch | "
        "gLLM decode tok/s (1 stream) | gLLM last first token (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best = {}
    for r in report["results"]:
        h = r.get("hf", {})
        best[r["model"]] = max(best.get(r["model"], 0.0), h.get("tok_per_s", 0.0))
    for r in report["results"]:
        g, h = r.get("gllm", {}), r.get("hf", {})
        ratio = f"{g['tok_per_s'] / h['tok_per_s']:.1f}x" if "tok_per_s" in g and "tok_per_s" in h else "-"
        vs_best = f"{g['tok_per_s'] / best[r['model']]:.1f}x" if "tok_per_s" in g and best[r["model"]] else "-"
        fmt = lambda d: f"{d['tok_per_s']:,.0f}" if "tok_per_s" in d else d.get("error", "-")[:40]  # noqa: E731
        dec = f"{g['decode_tok_per_s']:,.0f}" if "decode_tok_per_s" in g else ""
        model = r["model"] + (f" (token budget {r['token_budget']:,})" if "token_budget" in r else "")
        first = f"{g['last_first_token_ms']:,.0f}" if "last_first_token_ms" in g else ""  # the batch's slowest
        lines.append(f"| {model} | {r['batch']} | {fmt(g)} | {fmt(h)} | {ratio} | {vs_best} | {dec} | {first} |")
    plain = [r for r in report["results"] if "tok_per_s" in r.get("gllm_no_overlap", {})]
    if plain:
        lines += ["", "Without overlapped decoding (`LLMEngine(overlap=False)`): "
                  + "; ".join(f"{r['model']} batch {r['batch']}: {r['gllm_no_overlap']['tok_per_s']:,.0f} tok/s"
                              + (f" ({r['gllm_no_overlap']['decode_tok_per_s']:,.0f} decode)" if r["batch"] == 1 else "")
                              for r in plain)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
