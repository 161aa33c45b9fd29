"""How long the engine takes to start with the default model: a first load (empty cache: the GGUF file's
metadata and tokenizer are parsed and converted) against a later one (both from the cache).

Each load runs in a fresh Python process, so nothing stays warm in memory between them; the times cover
``LLMEngine(...)`` only (not the imports). Medians of ``--repeats`` loads of each kind.

    python benchmarks/startup.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_results  # noqa: E402

ONE_LOAD = """
import time, torch
torch.set_num_threads({threads})
from gllm.engine import GeneratorParams, LLMEngine
start = time.perf_counter()
LLMEngine("smollm2-135m-instruct", GeneratorParams(max_seq_len=512))
print(time.perf_counter() - start)
"""


def load_seconds(cache: str, threads: int) -> float:
    env = dict(os.environ, GLLM_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", ONE_LOAD.format(threads=threads)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "startup"))
    args = p.parse_args()
    first, later = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            first.append(load_seconds(cache, args.threads))
            later.append(load_seconds(cache, args.threads))
        print(f"first {first[-1]:.2f} s, later {later[-1]:.2f} s", flush=True)
    info = machine_info()
    rows = [["first load (empty cache)", f"{statistics.median(first):.2f}", ", ".join(f"{x:.2f}" for x in first)],
            ["later load (cached index and tokenizer)", f"{statistics.median(later):.2f}", ", ".join(f"{x:.2f}" for x in later)]]  # fmt: skip
    md = (f"# Engine start with the default model\n\n{info['cpu']}, {args.threads} threads, torch {info['torch']}. "
          f"Command: `python benchmarks/startup.py --repeats {args.repeats} --threads {args.threads}`\n\n"
          + markdown_table(["load", "median s", "each run (s)"], rows))
    write_results(args.out, {"machine": info, "threads": args.threads, "first_s": first, "later_s": later}, md)
    print(md)


if __name__ == "__main__":
    main()
