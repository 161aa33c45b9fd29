"""The Triton decode-attention kernel against the reference attention and the torch path (interpreter on CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernels on the CPU

import pytest
import torch

pytest.importorskip("triton")

from gllm.ops.attention import decode_attention  # noqa: E402
from gllm.ops.metadata import AttentionMetadata  # noqa: E402
from gllm.ops.reference import reference_attention  # noqa: E402
from gllm.ops.backend import triton_available  # noqa: E402
from gllm.ops.triton_attention import triton_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not triton_available(), reason="no GPU and no Triton interpreter")


def _decode_batch(
    seq_lens: list[int], kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, block_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random queries and cache for a batch of decodes, each sequence on shuffled, non-contiguous blocks."""
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold garbage that must never be read
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int64)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor(order[start : start + n])
        start += n
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    last = torch.tensor(seq_lens) - 1  # each decode's new token is its sequence's last
    slots = tables.gather(1, (last // block_size).unsqueeze(1)).squeeze(1) * block_size + last % block_size
    meta = AttentionMetadata(
        slot_mapping=slots.to(DEVICE),
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, device=DEVICE),
        query_lens_list=[1] * len(seq_lens),
        seq_lens_list=list(seq_lens),
        num_decodes=len(seq_lens),
        block_size=block_size,
    )
    return q.to(DEVICE), cache.to(DEVICE), meta


def _check(
    q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, num_splits: int | None = None,
    window: int | None = None, softcap: float | None = None,
) -> None:  # fmt: skip
    scale = q.shape[-1] ** -0.5
    max_len = max(meta.seq_lens_list)
    masks = {"window": window, "softcap": softcap}
    out = triton_decode_attention(q, cache, meta.block_tables, meta.seq_lens, max_len, scale, **masks,
                                  num_splits=num_splits)  # fmt: skip
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOLERANCE[q.dtype]
    expected = reference_attention(q.cpu(), cache.cpu(), _meta_on_cpu(meta), scale, **masks)
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=tol, rtol=tol)
    torch_path = decode_attention(q, cache, meta.block_tables, meta.seq_lens, max_len, scale, **masks)
    torch.testing.assert_close(out.float(), torch_path.float(), atol=tol, rtol=tol)


def _meta_on_cpu(meta: AttentionMetadata) -> AttentionMetadata:
    """The reference reads block tables with ``tolist`` and builds its masks on the CPU."""
    return AttentionMetadata(
        meta.slot_mapping.cpu(), meta.block_tables.cpu(), meta.seq_lens.cpu(),
        meta.query_lens_list, meta.seq_lens_list, meta.num_decodes, meta.block_size,
    )  # fmt: skip


# lengths: one token, exactly one block, several full blocks, partial last blocks
LENGTHS = [1, 16, 48, 5, 37]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_matches_reference_float32(head_dim: int, group: int) -> None:
    _check(*_decode_batch(LENGTHS, kv_heads=2, group=group, head_dim=head_dim, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_matches_reference_16bit(dtype: torch.dtype, group: int) -> None:
    _check(*_decode_batch(LENGTHS, kv_heads=2, group=group, head_dim=64, dtype=dtype))


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_other_block_sizes(block_size: int) -> None:
    _check(*_decode_batch([1, 8, 33, 70], kv_heads=1, group=2, head_dim=64, dtype=torch.float32, block_size=block_size))


def test_decode_odd_head_dim_and_group() -> None:
    """Neither is a power of two (e.g. 3 query heads per KV head, as in SmolLM2): both get padded and masked."""
    _check(*_decode_batch([3, 21], kv_heads=3, group=3, head_dim=48, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [2, 3])
def test_decode_split_sequences(dtype: torch.dtype, num_splits: int) -> None:
    """Flash-decoding: sequences cut into token ranges, including ranges past a short sequence's end."""
    _check(*_decode_batch([200, 1, 70], kv_heads=1, group=4, head_dim=64, dtype=dtype), num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 20])
def test_decode_sliding_window_and_softcap(num_splits: int, window: int) -> None:
    """Sliding-window layers (windows that start inside a block, splits wholly before the window) and
    Gemma 2's soft-capped scores."""
    q, cache, meta = _decode_batch([200, 1, 70, 21], kv_heads=2, group=2, head_dim=64, dtype=torch.float32)
    _check(q * 4, cache, meta, num_splits=num_splits, window=window, softcap=5.0)


@pytest.mark.parametrize("head_dim", [96, 256])
def test_decode_head_dims_of_phi_and_gemma(head_dim: int) -> None:
    _check(*_decode_batch(LENGTHS, kv_heads=1, group=2, head_dim=head_dim, dtype=torch.float32), window=30)
