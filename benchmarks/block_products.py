"""Speed of one matrix product straight from GGUF blocks, per block type, instruction set and row count.

A decode step of a quantized model is a chain of such products, so this is where its time goes. Each row
of the table is one weight (random valid blocks of a real model's shape) times ``m`` activation rows, on
every instruction set this CPU runs, beside float32 and bfloat16 ``F.linear`` on the same dense matrix.
``GB/s`` is the weight's bytes over the median time: a one-row product that reads its weight at the
machine's memory bandwidth cannot go faster.

    python benchmarks/block_products.py --types Q4_K,Q6_K,Q8_0 --rows 1,16,256 --out benchmarks/results/block_products
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gllm

from common import cpu_model, machine_info, markdown_table, report, summarize  # noqa: E402
from make_gguf import random_blocks  # noqa: E402

SHAPES = {  # SmolLM2-1.7B's matrices: (rows, columns)
    "qkv 6144x2048": (6144, 2048),
    "gate_up 16384x2048": (16384, 2048),
    "down 2048x8192": (2048, 8192),
}


def timed(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q4_0")
    p.add_argument("--rows", default="1,16,256", help="activation rows per product, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help="among: " + "; ".join(SHAPES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/block_products")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    from gllm.ops.block_linear import BlockLinear, BlockWeight, usable_isas

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results, table = [], []
    for shape_name in args.shapes.split(","):
        n, k = SHAPES[shape_name.strip()]
        for kind in args.types.split(","):
            weight = BlockWeight(kind, torch.from_numpy(random_blocks(kind, n, k, rng)))
            dense = weight.dequantize()
            dense_bf16 = dense.to(torch.bfloat16)
            nbytes = weight.blocks.numel()
            for m in rows_list:
                x = torch.randn(m, k)
                row = {"shape": shape_name, "type": kind, "rows": m, "weight_bytes": nbytes}
                cells = [shape_name, kind, m]
                for isa in usable_isas():
                    product = BlockLinear([weight], isa=isa)
                    t = summarize(timed(lambda: product(x), args.repeats))
                    row[isa] = t
                    cells.append(f"{t['median'] * 1e3:.2f} ms, {nbytes / t['median'] / 1e9:.1f} GB/s")
                t32 = summarize(timed(lambda: F.linear(x, dense), args.repeats))
                xb = x.to(torch.bfloat16)
                t16 = summarize(timed(lambda: F.linear(xb, dense_bf16), args.repeats))
                row["dense_float32"], row["dense_bfloat16"] = t32, t16
                cells += [f"{t32['median'] * 1e3:.2f} ms", f"{t16['median'] * 1e3:.2f} ms"]
                results.append(row)
                table.append(cells)
                print(" | ".join(str(c) for c in cells), flush=True)
    headers = ["matrix", "type", "rows", *usable_isas(), "dense float32", "dense bfloat16"]
    md = (f"# Products from GGUF blocks\n\n{cpu_model()}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats}. Command: `python benchmarks/block_products.py --types {args.types} --rows {args.rows}`\n\n"
          + markdown_table(headers, table))
    return report(args.out, {"machine": machine_info(), "results": results}, md)


if __name__ == "__main__":
    raise SystemExit(main())
