"""Helpers every benchmark shares: what machine ran it, how to time it, and how results are written.

A benchmark number means little without the machine, the library versions and the thread count behind
it, and a single timing on a shared machine means little at all. So every result file carries
``machine_info()``, and every timing is repeated and summarised by its median (the typical run) and its
best (the run least disturbed by other work on the same cores).

Nothing here imports torch at module level: ``--help`` of a benchmark must answer at once.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = ("torch", "transformers")) -> dict[str, Any]:
    """Machine, OS, Python, torch threads and the versions of ``packages``, for a result file's header."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    info.update({name: package_version(name) for name in packages})
    return info


def summarize(values: Sequence[float], higher_is_better: bool = False) -> dict[str, Any]:
    """Median, best, worst and every value of a repeated measurement, in the units given.

    Best is the smallest value (times) unless ``higher_is_better`` (rates such as tokens/s).
    """
    best, worst = (max, min) if higher_is_better else (min, max)
    return {
        "median": statistics.median(values),
        "best": best(values),
        "worst": worst(values),
        "all": list(values),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in 0..100."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def repeat(fn: Callable[[], T], repeats: int, warmup: int = 1) -> list[T]:
    """Call ``fn`` ``warmup`` times (results dropped: lazy init, allocator, caches), then ``repeats`` times."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``; uses ``perf_counter`` like the engine's metrics."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: str | os.PathLike[str], data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out>.json`` (``data`` plus a UTC timestamp) and ``<out>.md``; return both paths."""
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    stamped = {"written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data}
    json_path.write_text(json.dumps(stamped, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def report(out: str | os.PathLike[str], data: dict[str, Any], markdown: str) -> int:
    """``write_results``, then show the table and where it went; the script's exit status (0)."""
    json_path, md_path = write_results(out, data, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


def resolved_dtype(name: str, model: str = "smollm2-135m-instruct") -> str:
    """The precision ``gllm serve --model model --dtype name`` runs in on this machine, ``auto`` resolved as
    the engine does (a GGUF model whose products read its blocks runs in bfloat16 on any CPU)."""
    import torch

    from gllm.engine.llm_engine import resolve_dtype
    from gllm.loader import is_gguf
    from gllm.ops import block_linear

    blocks = block_linear.available() and is_gguf(model)
    return str(resolve_dtype(name, torch.device("cpu"), blocks)).removeprefix("torch.")
