"""Quality of each precision and each block-product path vs float32 on the default model.

Perplexity: exp of the mean negative prompt logprob of `benchmarks/data/public_domain.txt`.
Greedy agreement: 8 chat prompts x 64 greedy tokens; the share of tokens before the first divergence
from float32, and how many of the 8 continuations are identical. Goal: perplexity within 1% of float32.

Variants: ``hf`` is `transformers` in float32 loading the same GGUF file (it dequantizes: perplexity
only); ``float32`` and ``bfloat16`` run the engine on the file's weights dequantized (dense); ``int8``
is bfloat16 with weight-only int8 (``quantize="int8"``, CPUs with oneDNN bfloat16 only), here forced onto
every row of every step (the engine uses it only for steps of one or two rows), so its figures bound the
effect from above; ``blocks:ISA`` is what a user gets by default on the CPU: the products read the file's
blocks, the activations rounded to int8 (``gllm.ops.block_linear``), on that instruction set
(``GLLM_CPU_ISA``); ``blocks`` alone means every set this CPU runs.

    python benchmarks/quality.py [--variants hf,float32,bfloat16,int8,blocks]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # this checkout's gllm
from common import machine_info, markdown_table, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.loader import load_model  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL, resolve  # noqa: E402
from gllm.ops import block_linear, linear  # noqa: E402

DENSE = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8")}
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


def engine_for(variant: str) -> LLMEngine:
    """The engine of one variant: dense weights (a loaded model without blocks), or blocks on one ISA."""
    params = GeneratorParams(max_batch_size=8, max_seq_len=1024)
    if variant.startswith("blocks:"):
        os.environ["GLLM_CPU_ISA"] = variant.split(":", 1)[1]  # read when the products are built
        try:
            return LLMEngine(DEFAULT_MODEL, params)
        finally:
            del os.environ["GLLM_CPU_ISA"]
    dtype, quantize = DENSE[variant]
    linear.INT8_MAX_ROWS = 1 << 30  # int8 on every step, not only single-stream ones
    return LLMEngine(load_model(DEFAULT_MODEL, dtype), params, dtype=dtype, quantize=quantize)


def hf_perplexity(ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    path = Path(resolve(DEFAULT_MODEL))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    nll = -logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(float(nll.mean()))


def measure(variant: str) -> tuple[float, list[list[int]] | None]:
    if variant == "hf":
        tokenizer = engine_for("float32").tokenizer
        return hf_perplexity(tokenizer.encode(TEXT.read_text())[:1000]), None
    engine = engine_for(variant)
    ids = engine.tokenizer.encode(TEXT.read_text())[:1000]
    r = engine.generate([GenerationRequest(prompt_token_ids=ids, max_new_tokens=1, prompt_logprobs=True)])[0]
    nll = [-lp for lp in r.prompt_logprobs[1:]]
    ppl = math.exp(sum(nll) / len(nll))
    reqs = [GenerationRequest(messages=[{"role": "user", "content": c}], max_new_tokens=64, temperature=0, ignore_eos=True) for c in CHATS]
    return ppl, [g.token_ids for g in engine.generate(reqs)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def variants(spec: str) -> list[str]:
    """The variants asked for, float32 first (the baseline); ``blocks`` expands to every ISA this CPU runs."""
    names = []
    for name in spec.split(","):
        if name == "blocks":
            names += [f"blocks:{isa}" for isa in block_linear.usable_isas()]
        elif name == "int8" and not linear.packing_supported(torch.bfloat16, torch.device("cpu")):
            print("int8 skipped: this CPU has no oneDNN bfloat16 kernels", file=sys.stderr)
        else:
            names.append(name)
    return ["float32"] + [n for n in names if n != "float32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="hf,float32,bfloat16,int8,blocks")
    p.add_argument("--out", default="benchmarks/results/quality")
    args = p.parse_args()
    runs = {name: measure(name) for name in variants(args.variants)}
    base_ppl, base_tokens = runs["float32"]
    rows, data = [], {}
    for name, (ppl, tokens) in runs.items():
        change = ppl / base_ppl - 1
        data[name] = {"perplexity": ppl, "perplexity_change": change}
        if tokens is None:
            rows.append([name, f"{ppl:.3f}", f"{change:+.2%}", "-", "-"])
            continue
        agree = sum(common_prefix(a, b) for a, b in zip(tokens, base_tokens)) / sum(map(len, base_tokens))
        same = sum(a == b for a, b in zip(tokens, base_tokens))
        rows.append([name, f"{ppl:.3f}", f"{change:+.2%}", f"{agree:.1%}", f"{same}/{len(CHATS)}"])
        data[name].update(greedy_prefix_agreement=agree, identical=same)
    info = machine_info()
    md = (
        f"# Quality by precision and path: {DEFAULT_MODEL}\n\nText: `benchmarks/data/public_domain.txt`. {info['cpu']}, "
        f"torch {info['torch']}. Command: `python benchmarks/quality.py --variants {args.variants}`\n\n"
        + markdown_table(["variant", "perplexity", "vs float32", "greedy tokens before divergence", "identical continuations"], rows)
    )
    write_results(args.out, {"machine": info, "model": DEFAULT_MODEL, "results": data}, md)
    print(md)


if __name__ == "__main__":
    main()
