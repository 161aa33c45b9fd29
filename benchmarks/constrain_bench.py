"""Structured output's own costs, with the default model's tokenizer (49,152 tokens): grammar compile
time, per-step mask time for a batch, and the sampler's bitmask.

* **compile**: a grammar for a set of 20 tools (each with its own arguments schema), for the village's
  reply schema, and for llama.cpp's json.gbnf: ``GrammarCompiler.compile`` (grammar text to a matcher
  checked against the tokenizer), median of ``--repeats``;
* **masks at batch 16**: 16 matchers, each part-way through its own village reply, computed for one step
  the way the engine does (``MaskBuilder``, llguidance's threads, the GIL released), median per step over
  the replies' steps. The engine overlaps this with the model's forward pass;
* **bitmask in the sampler**: unpacking 16 masks and applying them to a [16, 49152] batch of logits.

    python benchmarks/constrain_bench.py      # writes benchmarks/results/constrain.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "npc_dialogue"))

from common import machine_info, markdown_table, report  # noqa: E402


def twenty_tools() -> list[dict]:
    kinds = [{"type": "string", "maxLength": 40}, {"type": "integer", "minimum": 0, "maximum": 999},
             {"enum": ["north", "south", "east", "west"]}, {"type": "boolean"}]
    return [{"name": f"tool_{i}", "description": f"Game action number {i}.",
             "parameters": {"type": "object", "additionalProperties": False,
                            "required": [f"arg_{j}" for j in range(1 + i % 3)],
                            "properties": {f"arg_{j}": kinds[(i + j) % 4] for j in range(1 + i % 3)}}}
            for i in range(20)]


def timed(fn) -> tuple[float, float]:
    """``fn()``'s wall time and the CPU time this process spent in it (all threads), in ms. On a shared
    machine the CPU time tells the work apart from the wait for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "constrain"))
    args = p.parse_args(argv)

    import torch

    from gllm.constrain import GrammarCompiler, MaskBuilder, OutputConstraint
    from gllm.constrain.tools import DOCUMENTED
    from gllm.loader import load_model
    from gllm.loader.registry import DEFAULT_MODEL
    from gllm.sample import Sampler, SamplingRow
    from npcs import REPLY_SCHEMA

    loaded = load_model(DEFAULT_MODEL)
    tokenizer, vocab = loaded.tokenizer, loaded.config.vocab_size
    compiler = GrammarCompiler(tokenizer, vocab, {tokenizer.hf.convert_tokens_to_ids("<|im_end|>")})
    start = time.perf_counter()
    compiler.lltokenizer  # noqa: B018 (built once per engine, on the first constrained request)
    tokenizer_ms = (time.perf_counter() - start) * 1000

    text_args = (compiler.token_id, vocab)
    gbnf = (HERE.parent / "tests" / "grammars" / "json.gbnf").read_text()
    grammars = {
        "20 tools, tool_choice auto": lambda: DOCUMENTED.grammar(twenty_tools(), "auto"),
        "20 tools, tool_choice required": lambda: DOCUMENTED.grammar(twenty_tools(), "required"),
        "village reply schema": lambda: OutputConstraint(json_schema=REPLY_SCHEMA).grammar_text(*text_args),
        "llama.cpp json.gbnf": lambda: OutputConstraint(grammar=gbnf).grammar_text(*text_args),
    }
    compile_rows = []
    for name, build in grammars.items():
        ms, cpu_ms = medians([timed(lambda: compiler.compile(build())) for _ in range(args.repeats)])
        compile_rows.append({"grammar": name, "compile_ms": ms, "compile_cpu_ms": cpu_ms})
        print(f"compile {name}: {ms:.2f} ms (CPU {cpu_ms:.2f} ms)", flush=True)

    # Sixteen village replies, each matcher stepped along its own text; masks computed for all at once.
    replies = [json.dumps({"say": f"Well met, traveller number {i}. The road north is long and cold.",
                           "mood": ["friendly", "wary", "amused", "neutral"][i % 4],
                           "action": {"type": "point", "item": "the north road"}}, separators=(", ", ": "))
               for i in range(16)]
    grammar = compiler.compile(OutputConstraint(json_schema=REPLY_SCHEMA).grammar_text(compiler.token_id, vocab))
    token_lists = [tokenizer.encode(r, add_special_tokens=False) for r in replies]
    constraints = [compiler.constraint(grammar) for _ in replies]
    masks = MaskBuilder(vocab)
    mask_times, plain_times, masked_times = [], [], []
    sampler = Sampler(0)
    logits = torch.randn(16, vocab)
    rows = [SamplingRow(0.7, top_p=0.9, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    sampler(logits, rows)  # warm-up: the CPU kernels load on the first call
    for step in range(min(map(len, token_lists))):
        result: list = []
        mask_times.append(timed(lambda: result.append(masks.start(list(enumerate(constraints))).result())))
        bitmask, failed = result[0]
        assert not failed
        for _ in range(3):  # alternate, so that both see the same load
            plain_times.append(timed(lambda: sampler(logits, rows)))
            masked_times.append(timed(lambda: sampler(logits, rows, bitmask)))
        for c, ids in zip(constraints, token_lists):
            assert c.matcher.consume_token(ids[step]), "the reply's own tokens must be allowed"
    mask_ms, mask_cpu_ms = medians(mask_times)
    plain_ms, plain_cpu_ms = medians(plain_times)
    masked_ms, masked_cpu_ms = medians(masked_times)
    mask_row = {"batch": 16, "steps": len(mask_times), "mask_ms_median": mask_ms, "mask_cpu_ms_median": mask_cpu_ms,
                "mask_ms_max": max(w for w, _ in mask_times), "sampler_ms_median": plain_ms,
                "sampler_cpu_ms_median": plain_cpu_ms, "sampler_masked_ms_median": masked_ms,
                "sampler_masked_cpu_ms_median": masked_cpu_ms}
    print(f"masks at batch 16: median {mask_ms:.2f} ms per step, CPU {mask_cpu_ms:.2f} ms "
          f"(max {mask_row['mask_ms_max']:.2f}); sampler {plain_ms:.2f} ms, with the bitmask {masked_ms:.2f} ms "
          f"(CPU {plain_cpu_ms:.2f} / {masked_cpu_ms:.2f})", flush=True)

    load = [round(x, 2) for x in os.getloadavg()]
    machine = machine_info(("torch", "llguidance"))
    markdown = "\n".join([
        "# Structured output: compile and mask costs",
        "",
        f"Default model's tokenizer ({vocab} tokens), CPU ({machine['cpu']}, {machine['usable_cores']} usable cores), "
        f"load average at the end {load}. Building llguidance's tokenizer, once per engine: {tokenizer_ms:.0f} ms. "
        f"Medians of {args.repeats} runs; CPU: the process's CPU time (all threads), which waiting for a busy "
        "machine's cores does not inflate.",
        "",
        markdown_table(["grammar", "compile (ms)", "CPU (ms)"],
                       [[r["grammar"], f"{r['compile_ms']:.2f}", f"{r['compile_cpu_ms']:.2f}"] for r in compile_rows]),
        "",
        markdown_table(["batch", "steps", "masks per step (ms)", "CPU (ms)", "slowest step (ms)",
                        "sampler without / with the bitmask (ms)", "CPU (ms)"],
                       [[16, mask_row["steps"], f"{mask_ms:.2f}", f"{mask_cpu_ms:.2f}", f"{mask_row['mask_ms_max']:.2f}",
                         f"{plain_ms:.2f} / {masked_ms:.2f}", f"{plain_cpu_ms:.2f} / {masked_cpu_ms:.2f}"]]),
        "",
        "Masks: 16 matchers, each following its own village reply (the reply schema), one step at a time;",
        "computed as the engine does, which runs this while the model computes the step's logits. Sampler:",
        "temperature 0.7, top-p 0.9 on [16, vocabulary] random logits, every row masked or none.",
    ])
    data = {"machine": machine, "settings": vars(args), "tokenizer_ms": tokenizer_ms, "compile": compile_rows,
            "masks": mask_row}
    return report(args.out, data, markdown)


if __name__ == "__main__":
    sys.exit(main())
