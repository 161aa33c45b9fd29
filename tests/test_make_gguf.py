"""The benchmark model generator (``benchmarks/make_gguf.py``): llama.cpp's mixes, valid random blocks,
Llama 3 RoPE factors, and files that gLLM loads and runs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import make_gguf  # noqa: E402
from make_gguf import BLOCKS, SHAPES, Shape  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402


def kinds(shape: Shape, mix: str) -> dict[str, str]:
    return {t.name: t.kind for t in make_gguf.tensors(shape, mix, rope_freqs=True)}


def test_q4_k_m_mix_follows_llama_cpp_recipe() -> None:
    shape = SHAPES["smollm2-1.7b"]  # 24 layers, tied embeddings, every row a multiple of 256
    plan = kinds(shape, "q4_k_m")
    more_bits = [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]  # first and last eighth, every third between
    for i in range(shape.layers):
        want = "Q6_K" if i in more_bits else "Q4_K"
        assert plan[f"blk.{i}.attn_v.weight"] == want and plan[f"blk.{i}.ffn_down.weight"] == want, i
        for stem in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert plan[f"blk.{i}.{stem}.weight"] == "Q4_K"
        assert plan[f"blk.{i}.attn_norm.weight"] == "F32"
    assert plan["token_embd.weight"] == "Q6_K"  # tied: the output head's type
    assert "output.weight" not in plan


def test_mixes_fall_back_for_rows_not_a_multiple_of_256() -> None:
    shape = SHAPES["smollm2-135m"]  # hidden 576: only ffn_down (1536 columns) takes 256-value blocks
    plan = kinds(shape, "q4_k_m")
    assert plan["token_embd.weight"] == "Q8_0"
    assert plan["blk.0.attn_q.weight"] == "Q5_0" and plan["blk.0.ffn_up.weight"] == "Q5_0"
    assert plan["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K in layer 0, which falls back to Q8_0
    assert plan["blk.0.ffn_down.weight"] == "Q6_K" and plan["blk.4.ffn_down.weight"] == "Q4_K"
    untied = kinds(replace(SHAPES["smollm2-1.7b"], tied=False), "q4_0")
    assert untied["token_embd.weight"] == "Q4_0" and untied["output.weight"] == "Q6_K"
    assert set(kinds(shape, "q8_0").values()) == {"Q8_0", "F32"}
    with pytest.raises(ValueError, match="fit no block type"):
        kinds(replace(shape, hidden=48, heads=3, kv_heads=1), "q4_k_m")  # 48 columns: no 32-value block


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_random_blocks_are_valid_and_sized(kind: str) -> None:
    rows, columns = 3, 2 * BLOCKS[kind][0]
    blocks = make_gguf.random_blocks(kind, rows, columns, np.random.default_rng(1))
    assert blocks.shape == (rows, columns // BLOCKS[kind][0] * BLOCKS[kind][1]) and blocks.dtype == np.uint8
    big = make_gguf.random_blocks(kind, 64, 8 * BLOCKS[kind][0], np.random.default_rng(2))
    values = gguf.quants.dequantize(big, gguf.GGMLQuantizationType[kind])
    assert values.shape == (64, 8 * BLOCKS[kind][0]) and np.isfinite(values).all()
    assert abs(values.std() / make_gguf.WEIGHT_STD - 1) < 0.1
    assert abs(values.mean()) < 0.15 * make_gguf.WEIGHT_STD  # Q4_0's codes -8..7 average half a step below 0


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    shape = SHAPES["llama-3.2-1b"]
    config = LlamaConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads, rope_theta=shape.rope_theta,
                         max_position_embeddings=shape.context, rope_scaling=dict(shape.rope_scaling))  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = shape.rope_theta ** -(torch.arange(0, shape.dim, 2, dtype=torch.float64) / shape.dim)
    factors = torch.from_numpy(make_gguf.llama3_rope_factors(shape)).double()
    assert factors.shape == (shape.dim // 2,) and factors.min() == 1.0 and factors.max() == 32.0
    torch.testing.assert_close(plain / factors, scaled.double(), rtol=1e-5, atol=0)
    assert "rope_freqs.weight" in kinds(shape, "q4_k_m")
    assert "rope_freqs.weight" not in {t.name for t in make_gguf.tensors(shape, "q4_k_m", rope_freqs=False)}


def test_architecture_switches_add_their_tensors() -> None:
    qwen2, qwen3 = kinds(SHAPES["qwen2.5-0.5b"], "q4_k_m"), kinds(SHAPES["qwen3-0.6b"], "q4_k_m")
    assert qwen2["blk.3.attn_k.bias"] == "F32" and "blk.3.attn_k_norm.weight" not in qwen2
    assert qwen3["blk.3.attn_q_norm.weight"] == "F32" and "blk.3.attn_q.bias" not in qwen3


@pytest.fixture(scope="module")
def tokenizer() -> dict:
    return make_gguf.default_tokenizer()


def test_written_file_reads_back_and_runs_in_the_engine(tmp_path: Path, tokenizer: dict) -> None:
    vocab = len(tokenizer["tokenizer.ggml.tokens"]) + 8  # eight padding tokens
    shape = Shape("llama", 256, 2, 4, 2, 512, vocab, False, 10000.0, 512)
    path = tmp_path / "tiny.gguf"
    plan = make_gguf.write_gguf(path, shape, "q4_k_m", "tiny", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    assert [(t.name, t.tensor_type.name) for t in reader.tensors] == [(t.name, t.kind) for t in plan]
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q4_K", "Q6_K"}
    assert reader.fields["general.file_type"].contents() == 15 and reader.fields["llama.vocab_size"].contents() == vocab
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == vocab and tokens[-1] == f"[PAD{vocab - 1}]"

    engine = LLMEngine(str(path), GeneratorParams(max_batch_size=2, max_seq_len=128), dtype=torch.float32)
    cfg = engine.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (vocab, 256, 2, 4, 2)
    assert not cfg.tie_word_embeddings and cfg.intermediate_size == 512
    request = GenerationRequest(messages=[{"role": "user", "content": "Hello"}], max_new_tokens=4, temperature=0)
    result = engine.generate([request])[0]
    assert len(result.token_ids) == 4 and all(np.isfinite(result.logprobs))
    assert engine.tokenizer.decode([vocab - 1]) == f"[PAD{vocab - 1}]"


# What each family's file must switch on in the engine's config (the shape's own sizes shrunk, its
# architecture's switches kept).
FAMILY_SWITCHES = {
    "gemma3-1b": {"family": "gemma3_text", "qk_norm": True, "sandwich_norms": True, "sliding_window": 512,
                  "local_layers": (0, 1, 2, 3, 4), "hidden_act": "gelu_tanh"},
    "gemma2-2b": {"family": "gemma2", "sandwich_norms": True, "sliding_window": 4096, "local_layers": (0, 2, 4),
                  "attn_logit_softcap": 50.0, "final_logit_softcap": 30.0},
    "phi4-mini": {"family": "phi3", "fused_checkpoint": True, "rotary_dim": 48},
    "smollm3-3b": {"family": "smollm3", "nope_layers": (3,)},
    "ministral3-3b": {"family": "ministral3"},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FAMILY_SWITCHES))
def test_family_shapes_load_with_their_switches(name: str, tmp_path: Path, tokenizer: dict) -> None:
    full = SHAPES[name]
    rotary = full.rotary_dim and full.rotary_dim * 64 // full.dim
    shape = replace(full, hidden=256, layers=6, heads=4, kv_heads=2, ffn=512, head_dim=64 if full.head_dim else None,
                    vocab=len(tokenizer["tokenizer.ggml.tokens"]), rotary_dim=rotary)  # fmt: skip
    path = tmp_path / f"{name}.gguf"
    make_gguf.write_gguf(path, shape, "q4_k_m", name, tokenizer=tokenizer)
    engine = LLMEngine(str(path), GeneratorParams(max_batch_size=2, max_seq_len=128), dtype=torch.float32)
    for key, value in FAMILY_SWITCHES[name].items():
        assert getattr(engine.config, key) == value, key
    if full.rope_scaling:
        assert engine.config.rope_scaling["rope_type"] == full.rope_scaling["rope_type"]
    request = GenerationRequest(prompt_token_ids=list(range(40)), max_new_tokens=4, temperature=0, ignore_eos=True)
    result = engine.generate([request])[0]
    assert len(result.token_ids) == 4 and all(np.isfinite(result.logprobs))
