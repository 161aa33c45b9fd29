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


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


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
        ms = median_ms(lambda: compiler.compile(build()), args.repeats)
        compile_rows.append({"grammar": name, "compile_ms": ms})
        print(f"compile {name}: {ms:.2f} ms", flush=True)

    # Sixteen village replies, each matcher stepped along its own text; masks computed for all at once.
    replies = [json.dumps({"say": f"Well met, traveller number {i}. The road north is long and cold.",
                           "mood": ["friendly", "wary", "amused", "neutral"][i % 4],
                           "action": {"type": "point", "item": "the north road"}}, separators=(", ", ": "))
               for i in range(16)]
    grammar = compiler.compile(OutputConstraint(json_schema=REPLY_SCHEMA).grammar_text(compiler.token_id, vocab))
    token_lists = [tokenizer.encode(r, add_special_tokens=False) for r in replies]
    constraints = [compiler.constraint(grammar) for _ in replies]
    masks = MaskBuilder(vocab)
    step_ms, apply_ms = [], []
    sampler = Sampler(0)
    logits = torch.randn(16, vocab)
    rows = [SamplingRow(0.7, top_p=0.9, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    for step in range(min(map(len, token_lists))):
        start = time.perf_counter()
        bitmask, failed = masks.start(list(enumerate(constraints))).result()
        step_ms.append((time.perf_counter() - start) * 1000)
        assert not failed
        start = time.perf_counter()
        sampler(logits, rows, bitmask)
        with_mask = time.perf_counter() - start
        start = time.perf_counter()
        sampler(logits, rows)
        apply_ms.append((with_mask - (time.perf_counter() - start)) * 1000)
        for c, ids in zip(constraints, token_lists):
            assert c.matcher.consume_token(ids[step]), "the reply's own tokens must be allowed"
    mask_row = {"batch": 16, "steps": len(step_ms), "mask_ms_median": statistics.median(step_ms),
                "mask_ms_max": max(step_ms), "sampler_extra_ms_median": statistics.median(apply_ms)}
    print(f"masks at batch 16: median {mask_row['mask_ms_median']:.3f} ms per step "
          f"(max {mask_row['mask_ms_max']:.2f}); sampler with the bitmask: "
          f"+{mask_row['sampler_extra_ms_median']:.2f} ms", flush=True)

    machine = machine_info(("torch", "llguidance"))
    markdown = "\n".join([
        "# Structured output: compile and mask costs",
        "",
        f"Default model's tokenizer ({vocab} tokens), CPU ({machine['cpu']}, {machine['usable_cores']} usable cores). "
        f"Building llguidance's tokenizer, once per engine: {tokenizer_ms:.0f} ms. Medians of {args.repeats} runs.",
        "",
        markdown_table(["grammar", "compile (ms)"], [[r["grammar"], f"{r['compile_ms']:.2f}"] for r in compile_rows]),
        "",
        markdown_table(["batch", "steps", "mask per step, median (ms)", "max (ms)",
                        "sampler's extra for the bitmask (ms)"],
                       [[16, mask_row["steps"], f"{mask_row['mask_ms_median']:.3f}", f"{mask_row['mask_ms_max']:.2f}",
                         f"{mask_row['sampler_extra_ms_median']:.2f}"]]),
        "",
        "Masks: 16 matchers, each following its own village reply (the reply schema), one step at a time;",
        "computed as the engine does, which runs this while the model computes the step's logits.",
    ])
    data = {"machine": machine, "settings": vars(args), "tokenizer_ms": tokenizer_ms, "compile": compile_rows,
            "masks": mask_row}
    return report(args.out, data, markdown)


if __name__ == "__main__":
    sys.exit(main())
