"""Write GGUF files of real model shapes with random weights, quantized the way llama.cpp ships them.

Speed and memory depend on a model's shape and on its weights' block types, not on what the weights say.
So a benchmark of a 1–2B model needs no download: this script writes a file with the shape of a known
model (``--shape``), in one of the common mixes (``--mix``), filled with random but valid blocks.

* ``q4_k_m``: llama.cpp's Q4_K_M recipe: Q4_K everywhere, Q6_K for the output head (the token
  embedding when tied) and for ``attn_v`` / ``ffn_down`` in the layers llama.cpp gives more bits
  (the first and last eighth, and every third layer between); rows that are not a multiple of 256
  fall back to Q5_0 (for Q4_K) and Q8_0 (for Q6_K).
* ``q8_0``: Q8_0 everywhere.
* ``q4_0``: Q4_0 everywhere, Q6_K output head (Q8_0 when its rows are not a multiple of 256).

gguf-py can write blocks but cannot quantize to K-quants. A block is only bytes, though: random quants and
scale bytes with sane float16 scales are valid blocks, which llama.cpp, ``gguf.quants.dequantize`` and
gLLM read alike. Scales are chosen so that every tensor's dequantized values have a standard deviation of
about 0.02 (the usual initialisation), so activations stay finite through the layers. Norm weights are 1.

The tokenizer is the default model's (SmolLM2's byte-level BPE, read from its GGUF file), padded with
unused ``[PAD<id>]`` tokens up to the shape's vocabulary, as llama.cpp's converter pads a vocabulary.
A shape with ``llama3`` RoPE scaling gets llama.cpp's ``rope_freqs.weight`` (per-dimension frequency
factors) unless ``--plain-rope`` asks for a file without it.

A new shape is one line in ``SHAPES``: its architecture and sizes. Each architecture brings the tensors
llama.cpp's loader asks of it: ``qwen2`` biases on Q/K/V, ``qwen3`` and ``gemma3`` RMSNorm on Q and K,
``gemma2`` / ``gemma3`` norms after attention and MLP too, ``phi3`` fused ``attn_qkv`` and a gate-and-up
``ffn_up``; ``smollm3`` and ``mistral3`` have Llama's tensors. A shape's sliding window, soft-caps,
partial rotary and YaRN scaling are written as metadata. Random weights make LongRoPE's factors
pointless, so Phi files carry none (the factors change no cost).

    python benchmarks/make_gguf.py --shape smollm2-1.7b --mix q4_k_m --out-dir ~/models
    python benchmarks/make_gguf.py --list
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gllm (the default tokenizer)

WEIGHT_STD = 0.02  # standard deviation of every matrix's dequantized values


@dataclass(frozen=True)
class Shape:
    """A model's architecture and sizes, in the terms of its HF ``config.json``."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    rope_theta: float
    context: int
    head_dim: int | None = None  # None: hidden // heads
    rms_eps: float = 1e-5
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # HF rope_scaling: "llama3" or "yarn"
    window: int = 0  # sliding window of the local layers (Gemma: every 2nd / 5 of every 6 layers)
    softcaps: tuple[float, float] | None = None  # attention-logit and final-logit soft-caps (Gemma 2)
    rotary_dim: int | None = None  # head dimensions RoPE rotates, when not all (Phi-4-mini)

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


YARN_ROPE = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384, "beta_fast": 32.0,
             "beta_slow": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip

SHAPES: dict[str, Shape] = {
    "smollm2-135m": Shape("llama", 576, 30, 9, 3, 1536, 49152, True, 100000.0, 8192),
    "smollm2-1.7b": Shape("llama", 2048, 24, 32, 32, 8192, 49152, True, 130000.0, 8192),
    "llama-3.2-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128256, True, 500000.0, 131072, rope_scaling=LLAMA3_ROPE),
    "qwen2.5-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, 151936, True, 1e6, 32768, rms_eps=1e-6),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 1e6, 32768, rms_eps=1e-6),
    "qwen3-0.6b": Shape("qwen3", 1024, 28, 16, 8, 3072, 151936, True, 1e6, 40960, head_dim=128, rms_eps=1e-6),
    "qwen3-1.7b": Shape("qwen3", 2048, 28, 16, 8, 6144, 151936, True, 1e6, 40960, head_dim=128, rms_eps=1e-6),
    "gemma3-1b": Shape("gemma3", 1152, 26, 4, 1, 6912, 262144, True, 1e6, 32768, head_dim=256, rms_eps=1e-6,
                       window=512),
    "gemma2-2b": Shape("gemma2", 2304, 26, 8, 4, 9216, 256000, True, 10000.0, 8192, head_dim=256, rms_eps=1e-6,
                       window=4096, softcaps=(50.0, 30.0)),
    "phi4-mini": Shape("phi3", 3072, 32, 24, 8, 8192, 200064, True, 10000.0, 131072, rotary_dim=96),
    "smollm3-3b": Shape("smollm3", 2048, 36, 16, 4, 11008, 128256, True, 5e6, 65536, rms_eps=1e-6),
    "ministral3-3b": Shape("mistral3", 3072, 26, 32, 8, 9216, 131072, True, 1e6, 262144, head_dim=128,
                           rope_scaling=YARN_ROPE),
}  # fmt: skip

ARCH_BIASES = {"qwen2"}  # Q, K and V projections have a bias
ARCH_QK_NORM = {"qwen3", "gemma3"}  # per-head RMSNorm on Q and K
ARCH_POST_NORMS = {"gemma2", "gemma3"}  # the attention and MLP outputs are normed too
ARCH_FUSED = {"phi3"}  # Q/K/V in one matrix, gate and up in one

# llama_ftype of each mix (general.file_type), as llama-quantize writes it
MIXES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}

# Block layouts (ggml's): bytes per 32- or 256-value block, where the float16 scale ``d`` lies, where a
# float16 minimum lies (None: symmetric), and the minimum relative to ``d`` that centres the values
# (Q4_1 / Q5_1 add their minimum, K-quants subtract theirs).
BLOCKS: dict[str, tuple[int, int, int, int | None, float]] = {
    # name: (values per block, bytes per block, d offset, min offset, min / d)
    "Q4_0": (32, 18, 0, None, 0.0),
    "Q4_1": (32, 20, 0, 2, -7.5),
    "Q5_0": (32, 22, 0, None, 0.0),
    "Q5_1": (32, 24, 0, 2, -15.5),
    "Q8_0": (32, 34, 0, None, 0.0),
    "Q4_K": (256, 144, 0, 2, 7.5),
    "Q5_K": (256, 176, 0, 2, 15.5),
    "Q6_K": (256, 210, 208, None, 0.0),
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # for rows that are not a multiple of 256


def use_more_bits(layer: int, layers: int) -> bool:
    """The layers whose ``attn_v`` and ``ffn_down`` llama.cpp's Q4_K_M stores in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def block_type(mix: str, role: str, layer: int, shape: Shape, columns: int) -> str:
    """The block type of one matrix in ``mix``: ``role`` is its GGUF name stem (``attn_v``, ``output``)."""
    head = role == "output" or (role == "token_embd" and shape.tied)
    if mix == "q8_0":
        kind = "Q8_0"
    elif head:
        kind = "Q6_K"
    elif mix == "q4_0":
        kind = "Q4_0"
    elif role in ("attn_v", "ffn_down") and use_more_bits(layer, shape.layers):
        kind = "Q6_K"
    elif role == "attn_qkv":
        kind = "Q5_K"
    else:
        kind = "Q4_K"
    if columns % BLOCKS[kind][0]:
        kind = FALLBACK[kind]
    if columns % BLOCKS[kind][0]:
        raise ValueError(f"{role}: {columns} columns fit no block type of mix {mix}")
    return kind


@dataclass(frozen=True)
class Tensor:
    name: str
    rows: int  # 0 for a vector
    columns: int
    kind: str  # a BLOCKS key or "F32"


def tensors(shape: Shape, mix: str, rope_freqs: bool) -> Iterator[Tensor]:
    """Every tensor of the file, layer by layer (llama.cpp's converter orders them otherwise; the order
    changes nothing for a reader)."""
    h, q_rows, kv_rows = shape.hidden, shape.heads * shape.dim, shape.kv_heads * shape.dim

    def matrix(name: str, rows: int, columns: int, layer: int = 0) -> Tensor:
        role = name.split(".")[-2]
        return Tensor(name, rows, columns, block_type(mix, role, layer, shape, columns))

    if rope_freqs and shape.rope_scaling.get("rope_type") == "llama3":
        yield Tensor("rope_freqs.weight", 0, shape.dim // 2, "F32")
    yield matrix("token_embd.weight", shape.vocab, h)
    for i in range(shape.layers):
        p = f"blk.{i}."
        yield Tensor(p + "attn_norm.weight", 0, h, "F32")
        fused, post_norms = shape.arch in ARCH_FUSED, shape.arch in ARCH_POST_NORMS
        if fused:
            yield matrix(p + "attn_qkv.weight", q_rows + 2 * kv_rows, h, i)
        for stem, rows in () if fused else (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
            yield matrix(f"{p}{stem}.weight", rows, h, i)
            if shape.arch in ARCH_BIASES:
                yield Tensor(f"{p}{stem}.bias", 0, rows, "F32")
        if shape.arch in ARCH_QK_NORM:
            yield Tensor(p + "attn_q_norm.weight", 0, shape.dim, "F32")
            yield Tensor(p + "attn_k_norm.weight", 0, shape.dim, "F32")
        yield matrix(p + "attn_output.weight", h, q_rows, i)
        if post_norms:
            yield Tensor(p + "post_attention_norm.weight", 0, h, "F32")
        yield Tensor(p + "ffn_norm.weight", 0, h, "F32")
        if not fused:
            yield matrix(p + "ffn_gate.weight", shape.ffn, h, i)
        yield matrix(p + "ffn_up.weight", (2 if fused else 1) * shape.ffn, h, i)
        yield matrix(p + "ffn_down.weight", h, shape.ffn, i)
        if post_norms:
            yield Tensor(p + "post_ffw_norm.weight", 0, h, "F32")
    yield Tensor("output_norm.weight", 0, h, "F32")
    if not shape.tied:
        yield matrix("output.weight", shape.vocab, h)


def _with_scales(raw: np.ndarray, kind: str, scale: np.ndarray) -> np.ndarray:
    """``raw`` blocks (``[..., block bytes]``) with their float16 scale (and minimum) set from ``scale``."""
    _, _, d_at, min_at, min_ratio = BLOCKS[kind]
    raw[..., d_at : d_at + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    if min_at is not None:
        raw[..., min_at : min_at + 2] = (scale * min_ratio).astype(np.float16)[..., None].view(np.uint8)
    return raw


@functools.cache
def _unit_std(kind: str) -> float:
    """Standard deviation of the values of random ``kind`` blocks whose scale is 1 (values are linear in it)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (256, BLOCKS[kind][1]), dtype=np.uint8)
    values = dequantize(_with_scales(raw, kind, np.ones(256)), GGMLQuantizationType[kind])
    return float(values.std())


def random_blocks(kind: str, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` rows of random ``kind`` blocks (``[rows, bytes per row]``), values of std about WEIGHT_STD.

    Each block's scale is jittered by ±25%, so blocks differ in range as real ones do.
    """
    per_block, nbytes = BLOCKS[kind][:2]
    raw = rng.integers(0, 256, (rows, columns // per_block, nbytes), dtype=np.uint8)
    scale = WEIGHT_STD / _unit_std(kind) * rng.uniform(0.75, 1.25, raw.shape[:2])
    return _with_scales(raw, kind, scale).reshape(rows, -1)


def llama3_rope_factors(shape: Shape) -> np.ndarray:
    """Per-frequency divisors of Llama 3's RoPE scaling, as llama.cpp stores them in ``rope_freqs.weight``.

    Long wavelengths (beyond the original context / ``low_freq_factor``) are slowed by ``factor``, short
    ones (below original context / ``high_freq_factor``) kept, and those between blended smoothly.
    """
    s = shape.rope_scaling
    original, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    freqs = shape.rope_theta ** -(np.arange(0, shape.dim, 2, dtype=np.float64) / shape.dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def tensor_data(t: Tensor, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    if t.name == "rope_freqs.weight":
        return llama3_rope_factors(shape)
    if t.kind == "F32":
        return np.ones(t.columns, np.float32) if t.name.endswith("norm.weight") else np.zeros(t.columns, np.float32)
    return random_blocks(t.kind, t.rows, t.columns, rng)


def default_tokenizer() -> dict[str, Any]:
    """The default model's tokenizer metadata (``tokenizer.*`` keys), read from its GGUF file."""
    from gguf import GGUFReader

    from gllm.loader.registry import DEFAULT_MODEL, resolve

    reader = GGUFReader(resolve(DEFAULT_MODEL))
    return {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}


def add_tokenizer(writer: Any, tokenizer: dict[str, Any], vocab: int) -> None:
    """The tokenizer, its vocabulary padded to ``vocab`` entries with unused ``[PAD<id>]`` tokens."""
    from gguf import TokenType

    tokens = list(tokenizer["tokenizer.ggml.tokens"])
    types = list(tokenizer["tokenizer.ggml.token_type"])
    if len(tokens) > vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the shape's vocabulary of {vocab}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [int(TokenType.UNUSED)] * (vocab - len(types))
    writer.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tokenizer["tokenizer.ggml.pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(tokenizer["tokenizer.ggml.merges"]))
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id),
                     ("add_bos_token", writer.add_add_bos_token), ("add_space_prefix", writer.add_add_space_prefix)):  # fmt: skip
        if f"tokenizer.ggml.{key}" in tokenizer:
            add(tokenizer[f"tokenizer.ggml.{key}"])
    if "tokenizer.chat_template" in tokenizer:
        writer.add_chat_template(tokenizer["tokenizer.chat_template"])


def add_metadata(writer: Any, shape: Shape, name: str, mix: str) -> None:
    writer.add_name(f"{name} shape, random weights")
    writer.add_file_type(MIXES[mix])
    writer.add_quantization_version(2)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.rotary_dim or shape.dim)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    if shape.dim != shape.hidden // shape.heads:
        writer.add_key_length(shape.dim)
        writer.add_value_length(shape.dim)
    if shape.window:
        writer.add_sliding_window(shape.window)
    if shape.softcaps:
        writer.add_attn_logit_softcapping(shape.softcaps[0])
        writer.add_final_logit_softcapping(shape.softcaps[1])
    if shape.rope_scaling.get("rope_type") == "yarn":
        add_yarn(writer, shape.rope_scaling)


def add_yarn(writer: Any, scaling: dict[str, Any]) -> None:
    """YaRN as llama.cpp's converter writes it for Ministral 3 (whose ``mscale`` equals ``mscale_all_dim``)."""
    from gguf import RopeScalingType

    writer.add_rope_scaling_type(RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
    writer.add_rope_scaling_yarn_log_mul(scaling["mscale_all_dim"])
    writer.add_attn_temperature_scale(scaling["llama_4_scaling_beta"])


def write_gguf(path: Path, shape: Shape, mix: str, name: str = "custom", seed: int = 0,
               rope_freqs: bool = True, tokenizer: dict[str, Any] | None = None) -> list[Tensor]:  # fmt: skip
    """Write the file, one tensor in memory at a time; return its tensors (name, size, block type)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    plan = list(tensors(shape, mix, rope_freqs))
    writer = GGUFWriter(path, shape.arch)
    add_metadata(writer, shape, name, mix)
    add_tokenizer(writer, tokenizer if tokenizer is not None else default_tokenizer(), shape.vocab)
    for t in plan:
        if t.kind == "F32":
            writer.add_tensor_info(t.name, (t.columns,), np.dtype(np.float32), 4 * t.columns)
        else:
            row_bytes = t.columns // BLOCKS[t.kind][0] * BLOCKS[t.kind][1]
            writer.add_tensor_info(t.name, (t.rows, row_bytes), np.dtype(np.uint8), t.rows * row_bytes,
                                   raw_dtype=GGMLQuantizationType[t.kind])  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for t in plan:
        writer.write_tensor_data(tensor_data(t, shape, rng))
    writer.close()
    return plan


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape (repeatable)")
    p.add_argument("--mix", action="append", choices=sorted(MIXES), help="block types (repeatable; default q4_k_m)")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the files go: <shape>-<mix>.gguf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-rope", action="store_true", help="no rope_freqs.weight for llama3 RoPE scaling")
    p.add_argument("--list", action="store_true", help="print the shapes and exit")
    args = p.parse_args(argv)
    if args.list or not args.shape:
        for name, s in SHAPES.items():
            print(f"{name:14} {s.arch:6} hidden {s.hidden}, {s.layers} layers, {s.heads}/{s.kv_heads} heads "
                  f"(head dim {s.dim}), FFN {s.ffn}, vocab {s.vocab}{', tied' if s.tied else ''}")  # fmt: skip
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = default_tokenizer()
    for name in args.shape:
        for mix in args.mix or ["q4_k_m"]:
            path = args.out_dir / f"{name}-{mix}{'-plain-rope' if args.plain_rope else ''}.gguf"
            plan = write_gguf(path, SHAPES[name], mix, name, args.seed, not args.plain_rope, tokenizer)
            kinds: dict[str, int] = {}
            for t in plan:
                kinds[t.kind] = kinds.get(t.kind, 0) + 1
            print(f"{path}: {path.stat().st_size / 1e9:.3f} GB, tensors by type {kinds}", flush=True)


if __name__ == "__main__":
    main()
