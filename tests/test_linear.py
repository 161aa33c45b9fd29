"""Packed CPU kernels for the linear layers (gllm.ops.linear) and the engine's dtype choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gllm.engine.llm_engine as llm_engine
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.engine.llm_engine import resolve_dtype
from gllm.ops.linear import INT8_MAX_ROWS, Int8Linear, PackedLinear, make_kernel, packing_supported, padded_rows

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not packing_supported(torch.bfloat16, CPU), reason="CPU without oneDNN bfloat16")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 65, 77])
def test_packed_linear_equals_f_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(rows, 64, generator=gen).bfloat16()
    torch.testing.assert_close(PackedLinear(weight)(x), F.linear(x, weight), rtol=1e-2, atol=1e-2)
    # a 3-D input keeps its leading dimensions
    assert PackedLinear(weight)(x.view(1, rows, 64)).shape == (1, rows, 96)


@needs_bf16
def test_int8_linear_is_close_for_few_rows_and_dense_for_many() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 64, generator=gen).bfloat16()
    kernel = Int8Linear(weight)
    few = torch.randn(INT8_MAX_ROWS, 64, generator=gen).bfloat16()
    exact = F.linear(few.float(), weight.float())
    error = (kernel(few).float() - exact).abs().max() / exact.abs().max()
    assert error < 0.02  # int8 per-channel rounding, not garbage
    assert not torch.equal(kernel(few), PackedLinear(weight)(few))  # really the int8 path
    many = torch.randn(INT8_MAX_ROWS + 5, 64, generator=gen).bfloat16()
    torch.testing.assert_close(kernel(many), PackedLinear(weight)(many))


def test_row_counts_fall_into_few_shapes() -> None:
    shapes = {padded_rows(n) for n in range(1, 2049)}
    assert len(shapes) <= 4 + 5 + 2048 // 64
    assert all(padded_rows(n) >= n for n in range(1, 2049)) and padded_rows(3) == 3 and padded_rows(500) == 512


def test_unknown_quantize_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="quantize"):
        make_kernel(torch.zeros(4, 4, dtype=torch.bfloat16), "int3")


def test_auto_dtype() -> None:
    expected = torch.bfloat16 if packing_supported(torch.bfloat16, CPU) else torch.float32
    assert resolve_dtype("auto", CPU) == expected
    assert resolve_dtype(torch.float32, CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", CPU)


@needs_bf16
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_packed_engine_matches_unpacked_model(gqa_model, quantize: str | None, monkeypatch) -> None:
    """The engine's packed bf16 model gives the tokens of the same model run with plain ``F.linear``."""
    tiny_model = gqa_model[0]
    params = GeneratorParams(block_size=8, max_batch_size=2, max_seq_len=64)
    packed = LLMEngine(tiny_model, params, dtype=torch.bfloat16, quantize=quantize)
    layers = [m for m in packed.model.modules() if hasattr(m, "kernel")]
    assert layers and all(m.kernel is not None and m.weight is None for m in layers)
    monkeypatch.setattr(llm_engine, "packing_supported", lambda dtype, device: False)
    plain = LLMEngine(tiny_model, params, dtype=torch.bfloat16)
    assert all(m.kernel is None for m in plain.model.modules() if hasattr(m, "kernel"))
    req = dict(prompt_token_ids=[5, 9, 13, 2, 7, 11], max_new_tokens=12, temperature=0.0)
    ours = packed.generate([GenerationRequest(**req)])[0]
    ref = plain.generate([GenerationRequest(**req)])[0]
    if quantize is None:
        assert ours.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(ours.logprobs, ref.logprobs)) < 0.05
    else:  # int8 may drift after a while; its first tokens must be the model's
        assert ours.token_ids[:3] == ref.token_ids[:3]
    assert packed.stats()["kv_blocks_in_use"] == 0


def test_quantize_needs_packed_bfloat16(gqa_model) -> None:
    with pytest.raises(ValueError, match="quantize"):
        LLMEngine(gqa_model[0], GeneratorParams(max_seq_len=64), dtype=torch.float32, quantize="int8")


def test_cli_model_options_reach_the_engine() -> None:
    from gllm.cli import build_parser, engine_options

    args = build_parser().parse_args(["generate", "hi"])
    assert (args.dtype, args.quantize, args.threads) == ("auto", None, None)
    args = build_parser().parse_args(["serve", "--dtype", "float32", "--quantize", "int8", "--threads", "1"])
    before = torch.get_num_threads()
    try:
        assert engine_options(args) == {"device": "cpu", "dtype": "float32", "quantize": "int8"}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    args.threads = 0
    with pytest.raises(ValueError, match="--threads"):
        engine_options(args)
