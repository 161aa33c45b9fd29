"""Quality of each precision vs float32 on the default model: perplexity and greedy agreement.

Perplexity: exp of the mean negative prompt logprob of `benchmarks/data/public_domain.txt`.
Greedy agreement: 8 chat prompts x 64 greedy tokens; the share of tokens before the first divergence
from float32, and how many of the 8 continuations are identical. Goal: perplexity within 1% of float32.
``int8`` is bfloat16 with weight-only int8 (``quantize="int8"``), here forced onto every row of every
step (the engine uses it only for steps of one or two rows), so its figures bound the effect from above.

    python benchmarks/quality.py [--dtypes float32,bfloat16,int8]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL  # noqa: E402
from gllm.ops import linear  # noqa: E402

VARIANTS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8")}
TEXT = Path(__file__).resolve().parent / "data" / "public_domain.txt"
CHATS = [
    "Greet a traveller arriving at the village gate.",
    "What does a blacksmith do all day?",
    "Describe the tavern in three sentences.",
    "Why should the guard let me pass?",
    "Tell me a short legend about the old mill.",
    "What is the best way to cross the river?",
    "Give advice to a young knight.",
    "What is two plus two? Explain.",
]


def measure(variant: str) -> tuple[float, list[list[int]]]:
    dtype, quantize = VARIANTS[variant]
    linear.INT8_MAX_ROWS = 1 << 30  # int8 on every step, not only single-stream ones
    engine = LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=8, max_seq_len=1024), dtype=dtype,
                       quantize=quantize)
    ids = engine.tokenizer.encode(TEXT.read_text())[:1000]
    r = engine.generate([GenerationRequest(prompt_token_ids=ids, max_new_tokens=1, prompt_logprobs=True)])[0]
    nll = [-lp for lp in r.prompt_logprobs[1:]]
    ppl = math.exp(sum(nll) / len(nll))
    reqs = [GenerationRequest(messages=[{"role": "user", "content": c}], max_new_tokens=64, temperature=0, ignore_eos=True) for c in CHATS]
    return ppl, [g.token_ids for g in engine.generate(reqs)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--out", default="benchmarks/results/quality")
    args = p.parse_args()
    names = args.dtypes.split(",")
    if names[0] != "float32":
        names.insert(0, "float32")
    runs = {name: measure(name) for name in names}
    base_ppl, base_tokens = runs["float32"]
    rows, data = [], {}
    for name, (ppl, tokens) in runs.items():
        agree = sum(common_prefix(a, b) for a, b in zip(tokens, base_tokens)) / sum(map(len, base_tokens))
        same = sum(a == b for a, b in zip(tokens, base_tokens))
        change = ppl / base_ppl - 1
        rows.append([name, f"{ppl:.3f}", f"{change:+.2%}", f"{agree:.1%}", f"{same}/{len(CHATS)}"])
        data[name] = {"perplexity": ppl, "perplexity_change": change, "greedy_prefix_agreement": agree, "identical": same}
    info = machine_info()
    md = (
        f"# Quality by precision: {DEFAULT_MODEL}\n\nText: `benchmarks/data/public_domain.txt`. {info['cpu']}, torch "
        f"{info['torch']}. Command: `python benchmarks/quality.py --dtypes {args.dtypes}`\n\n"
        + markdown_table(["dtype", "perplexity", "vs float32", "greedy tokens before divergence", "identical continuations"], rows)
    )
    write_results(args.out, {"machine": info, "model": DEFAULT_MODEL, "results": data}, md)
    print(md)


if __name__ == "__main__":
    main()
