"""LoRA adapters per request: 16 streams under 16 different adapters vs 16 streams on the base model.

Every stream decodes ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt, all 16 in one
engine at once. The adapters are random PEFT files (rank ``--rank`` on q, k, v, o, gate, up and down,
what a personality adapter trained on every projection looks like), written to a temporary folder.
The figure is decode throughput (generated tokens per second, summed over the streams); the goal is at
least 0.8x the base model's. On the CPU the adapters' rows go through the C++ kernels of ``lora_rows.cpp``;
the same cases with torch's batched products instead are measured beside them.

    python benchmarks/lora_throughput.py [--model NAME_OR_PATH] [--threads 2] [--repeats 3] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, summarize, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL  # noqa: E402
from gllm.lora import grouped  # noqa: E402
from gllm.lora.adapter import projection_shapes  # noqa: E402
from gllm.ops import cpu_kernels  # noqa: E402

STREAMS = 16


def write_adapter(folder: Path, config, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter for every projection of the model."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in projection_shapes(config).items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * inp**-0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
    return folder


def run(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> float:
    requests = [GenerationRequest(prompt_token_ids=p, max_new_tokens=new_tokens, temperature=0, ignore_eos=True,
                                  adapter=a) for p, a in zip(prompts, adapters)]  # fmt: skip
    ids = [engine.add_request(r) for r in requests]
    first, done = None, 0
    while done < len(ids):
        out = engine.step()
        if first is None and len(out.deltas) == len(ids):  # every stream has its first token: decoding starts
            first, counted = time.perf_counter(), engine.stats()["generated_tokens"]
        done += len(out.finished)
    return (engine.stats()["generated_tokens"] - counted) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_throughput"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    params = GeneratorParams(max_batch_size=STREAMS, max_seq_len=args.prompt_tokens + args.new_tokens + 16)
    with tempfile.TemporaryDirectory() as tmp:
        engine = LLMEngine(args.model, params)
        for i in range(STREAMS):
            engine.load_adapter(f"npc{i}", write_adapter(Path(tmp) / f"npc{i}", engine.config, args.rank, i))
        gen = torch.Generator().manual_seed(0)
        # different prompts per stream, so the prefix cache does not turn the prompts into one
        prompts = [torch.randint(100, 40000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(STREAMS)]
        cases = {"base model": [None] * STREAMS, f"{STREAMS} adapters": [f"npc{i}" for i in range(STREAMS)],
                 "one adapter": ["npc0"] * STREAMS}  # fmt: skip
        if engine.device.type == "cpu" and cpu_kernels.available():  # the same, with torch's products instead
            cases |= {f"{STREAMS} adapters, torch products": cases[f"{STREAMS} adapters"],
                      "one adapter, torch products": cases["one adapter"]}
        run(engine, prompts, cases["base model"], 8)  # warm-up
        rates = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits every case alike
            for name, adapters in cases.items():
                grouped.CPU_KERNELS = "torch products" not in name
                engine.block_manager.pool.clear_cache()
                rates[name].append(run(engine, prompts, adapters, args.new_tokens))
                print(f"{name}: {rates[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    base = summarize(rates["base model"], higher_is_better=True)["median"]
    rows = [[name, f"{summarize(r, higher_is_better=True)['median']:.1f}", f"{summarize(r, higher_is_better=True)['median'] / base:.2f}x",
             ", ".join(f"{x:.1f}" for x in r)] for name, r in rates.items()]  # fmt: skip
    table = markdown_table(["streams", "decode tok/s (median)", "vs base", "runs"], rows)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # shared machine: say how busy it was
    data = {"machine": machine_info(), "args": vars(args), "dtype": str(engine.dtype), "rates": rates,
            "load_average_1min_before_after": load}
    md = (f"# LoRA throughput: {STREAMS} streams\n\nModel {args.model} ({engine.dtype}), {args.threads} threads, "
          f"prompts {args.prompt_tokens} tokens, {args.new_tokens} new tokens per stream, adapters rank {args.rank} "
          f"on q/k/v/o/gate/up/down; CPU {data['machine']['cpu']}; load average (1 min) {load[0]} before, "
          f"{load[1]} after.\n\n{table}\n")
    write_results(args.out, data, md)
    print(md)


if __name__ == "__main__":
    main()
