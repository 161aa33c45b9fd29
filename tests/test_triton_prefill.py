"""The Triton prompt-chunk kernel and the Triton backend's whole-batch attention against the reference
(interpreter on CPU): cached prefixes, chunks across blocks, GQA ratios 1 to 8, head dims 64 and 128."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernels on the CPU

import pytest
import torch

pytest.importorskip("triton")

from gllm.ops import reference_attention  # noqa: E402
from gllm.ops.backend import triton_available  # noqa: E402
from gllm.ops.triton_prefill import triton_paged_attention  # noqa: E402
from test_attention import build_batch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not triton_available(), reason="no GPU and no Triton interpreter")

# (context length, new tokens): a whole prompt, a chunk after a cached prefix, chunks that start and end
# inside blocks, one-token chunks after prompts, and decodes (sorted first by build_batch)
MIXES = {
    "prompts": [(37, 37), (5, 5), (16, 16)],
    "prefixes": [(70, 23), (33, 1), (48, 16), (90, 65)],
    "with_decodes": [(20, 1), (3, 1), (57, 57), (41, 9)],
}


def check(seqs, kv_heads, group, head_dim, dtype, block_size=16, seed=0, window=None, softcap=None):
    q, cache, meta = build_batch(seqs, kv_heads, group, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    expected = reference_attention(q.float(), cache.float(), meta, scale, window=window, softcap=softcap)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    meta.slot_mapping, meta.block_tables, meta.seq_lens = on(meta.slot_mapping), on(meta.block_tables), on(meta.seq_lens)
    got = triton_paged_attention(on(q), on(cache), meta, scale, window=window, softcap=softcap)
    assert got.shape == q.shape and got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu().float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_chunks_match_reference_float32_head_dim_64(mix, group):
    check(MIXES[mix], kv_heads=2, group=group, head_dim=64, dtype=torch.float32)


@pytest.mark.parametrize("group", [1, 3])
def test_chunks_head_dim_128_and_odd_group(group):
    check(MIXES["prefixes"], kv_heads=1, group=group, head_dim=128, dtype=torch.float32, block_size=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunks_16bit(dtype):
    check(MIXES["with_decodes"], kv_heads=2, group=4, head_dim=64, dtype=dtype)


def test_long_chunk_spans_many_query_tiles():
    check([(300, 200), (7, 1)], kv_heads=1, group=4, head_dim=64, dtype=torch.float32, block_size=16, seed=3)


@pytest.mark.parametrize("window", [1, 9, 40])
def test_chunks_sliding_window_and_softcap(window):
    """Sliding-window layers: rows whose window starts after the program's first keys see no key in the
    first tiles (their running maximum stays -inf there); Gemma 2's soft-capped scores."""
    check(MIXES["prefixes"] + [(300, 200)], kv_heads=2, group=2, head_dim=64, dtype=torch.float32, window=window,
          softcap=5.0)


def test_chunks_head_dims_of_phi_and_gemma():
    check(MIXES["with_decodes"], kv_heads=1, group=2, head_dim=96, dtype=torch.float32, window=12)
    check(MIXES["prompts"], kv_heads=1, group=2, head_dim=256, dtype=torch.float32)
