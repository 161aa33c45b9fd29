#!/usr/bin/env bash
# Everything the GPU path needs checked, in one go (210 s on an H100 on 2026-11-26):
#   1. the correctness tests on CUDA (engine vs HF, every model family, KV reuse, Triton kernels
#      compiled, CUDA graphs, overlapped decoding);
#   2. throughput of this engine vs HF `generate`, and profiles of one stream and of the largest batch
#      (benchmarks/gpu_bench.py).
# Needs PyTorch with CUDA, Triton, transformers, pytest and hypothesis; gguf, msgpack, pyzmq and tqdm for
# imports. Results go to $OUT (default benchmarks/results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GLLM_TEST_DEVICE=cuda TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout 280 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_triton_attention.py tests/test_triton_prefill.py tests/test_triton_fused.py \
    tests/test_overlap.py \
    tests/test_parity_hf.py tests/test_families.py tests/test_kv_reuse.py tests/test_engine.py \
    2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 315 python3 benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, benchmark exit $bench_rc"
exit $(( tests_rc || bench_rc ))
