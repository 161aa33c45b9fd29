"""llama.cpp's own benchmark tools on the default model's GGUF, for ``cpu_bench.py``'s comparison column.

``llama-bench`` gives prompt processing (``-p``) and single-stream generation (``-n``) speeds;
``llama-batched-bench`` gives the summed generation speed of many parallel sequences (its S_TG column).
How to build both from the llama-cpp-python source distribution: ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from common import summarize


class LlamaCppSystem:
    def __init__(self, folder: Path, threads: int):
        from gllm.loader.registry import DEFAULT_MODEL, resolve

        self.bench, self.batched = folder / "llama-bench", folder / "llama-batched-bench"
        for tool in (self.bench, self.batched):
            if not tool.exists():
                raise SystemExit(f"--llama-cpp: {tool} not found (build llama.cpp's tools, see benchmarks/README.md)")
        self.model, self.threads = str(resolve(DEFAULT_MODEL)), threads
        self.name = "llama.cpp (same GGUF)"

    def _run(self, *args: str) -> str:
        cmd = [*args, "-m", self.model, "-t", str(self.threads)]
        print("  $", " ".join(cmd), flush=True)
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def _bench(self, prompt: int, gen: int, repeats: int) -> list[float]:
        """Tokens/s of each repetition of one llama-bench test (``-p prompt`` or ``-n gen``)."""
        out = json.loads(self._run(str(self.bench), "-p", str(prompt), "-n", str(gen), "-r", str(repeats), "-o", "json"))
        (entry,) = [e for e in out if e["n_prompt"] == prompt and e["n_gen"] == gen]
        return entry.get("samples_ts") or [entry["avg_ts"]]

    def _batched(self, streams: int, gen: int) -> float:
        """S_TG (summed generation tokens/s) for ``streams`` sequences of 128 prompt + ``gen`` tokens."""
        out = self._run(str(self.batched), "-c", str(streams * (128 + gen) + 64), "-npp", "128", "-ntg", str(gen),
                        "-npl", str(streams), "--output-format", "jsonl")
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return next(r["speed_tg"] for r in rows if r["pl"] == streams)

    def measure(self, streams: int, new_tokens: int, repeats: int) -> dict[str, Any]:
        return {
            "single_decode_tps": summarize(self._bench(0, new_tokens, repeats), higher_is_better=True),
            "multi_decode_tps": summarize([self._batched(streams, new_tokens) for _ in range(repeats)],
                                          higher_is_better=True),
            "prefill_tps": summarize(self._bench(512, 0, repeats), higher_is_better=True),
            "ttft_500_ms": summarize([500_000 / ts for ts in self._bench(500, 0, repeats)]),
        }
