"""llama.cpp's own benchmark tools on a GGUF file, for ``cpu_bench.py``'s comparison column.

``llama-bench`` gives prompt processing (``-p``) and single-stream generation (``-n``) speeds;
``llama-batched-bench`` gives the summed generation speed of many parallel sequences (its S_TG column).
Memory is each tool's peak resident set (``ru_maxrss`` of the finished child): llama.cpp maps the file,
so it counts the weights it touched, plus its KV cache. The batched runs get a context of ``streams x
max_seq_len`` tokens, gLLM's KV capacity, so that both hold a cache of the same size. Start-up is the
wall time of a ``llama-bench`` run of one prompt token without warm-up (loading the file, building a
context, one tiny step). How to build the tools from the llama-cpp-python source distribution:
``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import summarize


class LlamaCppSystem:
    def __init__(self, folder: Path, model: Path, threads: int):
        self.bench, self.batched = folder / "llama-bench", folder / "llama-batched-bench"
        for tool in (self.bench, self.batched):
            if not tool.exists():
                raise SystemExit(f"--llama-cpp: {tool} not found (build llama.cpp's tools, see benchmarks/README.md)")
        self.model, self.threads = str(model), threads
        self.name = "llama.cpp (same GGUF)"
        self.peak_mb = 0.0

    def _run(self, *args: str) -> str:
        """Run a tool on the model; note its peak resident memory."""
        cmd = [*args, "-m", self.model, "-t", str(self.threads)]
        print("  $", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd, out)
        self.peak_mb = max(self.peak_mb, usage.ru_maxrss / 1024)  # kB on Linux
        return out

    def _bench(self, prompts: Sequence[int], gen: int, repeats: int) -> dict[tuple[int, int], list[float]]:
        """Tokens/s of each repetition of each llama-bench test, by (prompt tokens, generated tokens)."""
        out = json.loads(self._run(str(self.bench), "-p", ",".join(map(str, prompts)), "-n", str(gen),
                                   "-r", str(repeats), "-o", "json"))  # fmt: skip
        return {(e["n_prompt"], e["n_gen"]): e.get("samples_ts") or [e["avg_ts"]] for e in out}

    def _batched(self, streams: int, gen: int, context: int) -> float:
        """S_TG (summed generation tokens/s) for ``streams`` sequences of 128 prompt + ``gen`` tokens."""
        out = self._run(str(self.batched), "-c", str(max(context, streams * (128 + gen) + 64)), "-npp", "128",
                        "-ntg", str(gen), "-npl", str(streams), "--output-format", "jsonl")  # fmt: skip
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return next(r["speed_tg"] for r in rows if r["pl"] == streams)

    def _startup_s(self) -> float:
        start = time.perf_counter()
        self._run(str(self.bench), "-p", "1", "-n", "0", "-r", "1", "--no-warmup", "-o", "json")
        return time.perf_counter() - start

    def measure(self, workloads: Sequence[str], streams: int, new_tokens: int, repeats: int,
                max_seq_len: int) -> dict[str, Any]:  # fmt: skip
        """``cpu_bench.py``'s rows named in ``workloads`` (``prefill_<N>_tps``, ``ttft_500_ms``, ...), its
        memory and start-up."""
        prefill = [int(w.split("_")[1]) for w in workloads if w.startswith("prefill_")]
        prompts = prefill + ([500] if "ttft_500_ms" in workloads else [])
        gen = new_tokens if "single_decode_tps" in workloads else 0
        runs = self._bench(prompts or [0], gen, repeats) if prompts or gen else {}
        rate = lambda values: summarize(values, higher_is_better=True)  # noqa: E731
        out = {f"prefill_{n}_tps": rate(runs[n, 0]) for n in prefill}
        if gen:
            out["single_decode_tps"] = rate(runs[0, gen])
        if "ttft_500_ms" in workloads:
            out["ttft_500_ms"] = summarize([500_000 / ts for ts in runs[500, 0]])
        if "multi_decode_tps" in workloads:
            out["multi_decode_tps"] = rate([self._batched(streams, new_tokens, streams * max_seq_len)
                                            for _ in range(repeats)])  # fmt: skip
        out["peak_run_mb"] = summarize([self.peak_mb])
        out["startup_warm_s"] = summarize([self._startup_s() for _ in range(repeats)])
        return out
