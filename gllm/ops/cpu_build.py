"""Build gLLM's C++ sources for this machine once, keep the library in the cache folder, load it.

The sources are compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++``), each with ``-march=native`` and its own target flags: the quantized products have one
source per x86 instruction set (AVX2, AVX-VNNI, AVX512-VNNI, AMX), each compiled for its set whatever
this CPU has, and ``quant_dispatch.cpp`` picks at run time among those the CPU runs. A source the
compiler cannot target is compiled without its flags, where it reduces to a stub that is never chosen.
The objects are linked into one library named by a hash of the sources, compiler, flags and CPU, in the
cache folder of ``gllm.loader.cache`` (a folder in the temporary directory when caching is off), so
later processes load it at once. ``GLLM_CPU_KERNELS=0`` turns the library off.
"""

from __future__ import annotations

import ctypes
import functools
import getpass
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gllm.loader.cache import cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl"]
SOURCES = {  # source: its x86 target flags
    "cpu_kernels.cpp": [],
    "lora_rows.cpp": [],
    "quant_dispatch.cpp": [],
    "quant_portable.cpp": [],
    "quant_avx2.cpp": _AVX2,
    "quant_avxvnni.cpp": [*_AVX2, "-mavxvnni"],
    "quant_avx512vnni.cpp": [*_AVX512, "-mavx512vnni"],
    "quant_amx.cpp": [*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
}
EXACT_SOURCES = {"quant_dispatch.cpp"}  # dequantizes as gguf does: no fused multiply-adds
HEADERS = ("bf16.h", "quant_formats.h", "quant_x86.h")
FLAG_SETS = (  # tried in turn: the first that builds wins
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-fno-math-errno"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compile(cxx: str, flags: list[str], source: str, obj: Path) -> bool:
    """One object file: with the source's target flags, else (the compiler cannot target them) without."""
    extra = ["-ffp-contract=off"] if source in EXACT_SOURCES else []
    targets = SOURCES[source] if X86 else []
    for target in [targets, []] if targets else [[]]:
        cmd = [cxx, *flags, *COMMON_FLAGS, *extra, *target, "-c", str(HERE / source), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            return True
        log.debug("compiling %s failed:\n%s", " ".join(cmd), done.stderr)
    return False


def build(cxx: str, folder: Path) -> Path | None:
    """Compile and link the sources into ``folder`` (a cache folder shared by several machines keeps one
    build per kind of CPU); None on failure."""
    text = b"\0".join((HERE / name).read_bytes() for name in [*SOURCES, *HEADERS])
    for flags in FLAG_SETS:
        key = hashlib.sha256(text + "\0".join([cxx, *flags, *COMMON_FLAGS, _cpu()]).encode()).hexdigest()[:16]
        target = folder / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
            objects = [Path(scratch) / f"{Path(name).stem}.o" for name in SOURCES]
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                built = list(pool.map(lambda pair: _compile(cxx, flags, *pair), zip(SOURCES, objects)))
            if not all(built):
                continue
            tmp = Path(scratch) / target.name
            cmd = [cxx, *flags, *COMMON_FLAGS, "-shared", *map(str, objects), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, target)  # whole or not at all: another process may be loading it
                return target
            log.debug("linking CPU kernels with %s failed:\n%s", " ".join(cmd), done.stderr)
    return None


def load(cxx: str, folder: Path) -> ctypes.CDLL | None:
    """The built library, loaded; a cached build that does not load (a damaged file) is built again once."""
    path = build(cxx, folder)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        path = build(cxx, folder)
        return None if path is None else ctypes.CDLL(str(path))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The library, built on first call; None when the kernels are off or cannot be built (logged)."""
    if os.environ.get("GLLM_CPU_KERNELS", "1") == "0":
        return None
    cxx = compiler()
    if cxx is None:
        log.warning("no C++ compiler found: the CPU runs plain torch ops (slower); set CXX to enable its kernels")
        return None
    folder = cache_dir()  # with caching off, one folder per user in the temporary directory
    folder = Path(tempfile.gettempdir()) / f"gllm-kernels-{getpass.getuser()}" if folder is None else folder / "kernels"
    try:
        lib = load(cxx, folder)
    except OSError as err:
        log.warning("the CPU kernels could not be built or loaded (%s): using plain torch ops", err)
        return None
    if lib is None:
        log.warning("building the CPU kernels with %s failed: using plain torch ops", cxx)
    return lib
