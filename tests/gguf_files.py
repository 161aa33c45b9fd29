"""GGUF files of tiny random Llama models for the tests, in llama.cpp's mixes of block types.

gguf-py quantizes only the 32-value types (Q4_0 ... Q8_0); Q4_K, Q5_K and Q6_K are quantized here in the
formats gguf-py dequantizes, by the plain min/max rule (not llama.cpp's search for the best scales: any
valid blocks serve, since the engine and `transformers` both decode the same bytes).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from transformers import LlamaConfig, LlamaForCausalLM

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _halves(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def quantize_q45k(rows: np.ndarray, five: bool) -> np.ndarray:
    """Q4_K (or Q5_K): per 32 values a 6-bit scale and minimum, per 256 a float16 d and dmin."""
    top = 31 if five else 15
    x = rows.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 groups
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    step, low = (hi - lo) / top, -lo  # x ~ step * q - low
    d, dmin = step.max(-1) / 63, low.max(-1) / 63
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(low / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    scale, offset = (d16[:, None] * sc)[..., None], (dmin16[:, None] * mn)[..., None]
    q = np.clip(np.rint((x + offset) / np.where(scale > 0, scale, 1)), 0, top).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), np.uint8)  # 6-bit scales and minimums, llama.cpp's order
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # groups 2c (low nibbles) and 2c + 1 (high) share 32 bytes
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    parts = [_halves(d).reshape(-1, 2), _halves(dmin).reshape(-1, 2), packed]
    if five:  # bit j of high byte l: the fifth bit of value l of group j
        parts.append(((q >> 4).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8))
    blocks = np.concatenate([*parts, qs], axis=1)
    return blocks.reshape(rows.shape[0], -1)


def quantize_q6k(rows: np.ndarray) -> np.ndarray:
    """Q6_K: per 16 values an int8 scale, per 256 a float16 d; quants 0..63 stand for -32..31."""
    x = rows.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(x).max(-1) / 31
    d = np.abs(step).max(-1) / 127
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)
    scale = (d.astype(np.float16).astype(np.float32)[:, None] * sc)[..., None]
    q = (np.clip(np.rint(x / np.where(scale != 0, scale, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    blocks = np.concatenate([ql.reshape(-1, 128), qh.sum(2, dtype=np.uint8).reshape(-1, 64), sc.view(np.uint8),
                             _halves(d).reshape(-1, 2)], axis=1)  # fmt: skip
    return blocks.reshape(rows.shape[0], -1)


def quantize(rows: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype in (QType.Q4_K, QType.Q5_K):
        return quantize_q45k(rows, five=qtype == QType.Q5_K)
    if qtype == QType.Q6_K:
        return quantize_q6k(rows)
    return gguf.quants.quantize(rows, qtype)


def tiny_llama(seed: int = 0, hidden: int = 256, ffn: int = 512, heads: int = 4, kv_heads: int = 2, layers: int = 2,
               vocab: int = 320, tie: bool = False) -> LlamaForCausalLM:  # fmt: skip
    """A random Llama whose rows are multiples of 256 (K types need them). A quiet body (weights of
    standard deviation 0.02) and a head four times stronger: its predictions are about as sharp as a
    trained model's (top-1 logprob near -3) without the chaos of a large random network, where any
    rounding anywhere reorders the logits."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def q4_k_m_types(name: str, layer: int | None) -> QType:
    """llama.cpp's Q4_K_M choice: Q6_K for the output head and for attn_v / ffn_down of some layers
    (here the even ones), Q4_K elsewhere; one Q5_K matrix here so that the file holds that type too."""
    if name in ("output", "attn_v", "ffn_down") and (layer is None or layer % 2 == 0):
        return QType.Q6_K
    return QType.Q5_K if name == "attn_output" and layer == 1 else QType.Q4_K


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows [a0..a(d/2-1), b0..] become [a0, b0, a1, b1, ...]."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path: Path, model: LlamaForCausalLM, types=q4_k_m_types) -> Path:
    """``model`` as llama.cpp's converter and quantizer would write it: norms F32, each matrix in
    ``types(gguf name stem, layer or None)``."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
                       "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size}.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_float32("llama.rope.freq_base", cfg.rope_parameters["rope_theta"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    for name, tensor in state.items():
        stem, _, suffix = name.rpartition(".")
        if stem in GLOBAL_NAMES:
            gguf_stem, layer = GLOBAL_NAMES[stem], None
        else:
            _, _, number, layer_stem = stem.split(".", 3)
            gguf_stem, layer = LAYER_NAMES[layer_stem], int(number)
        array = tensor.detach().float().numpy()
        if gguf_stem == "attn_q":
            array = _permute(array, cfg.num_attention_heads)
        elif gguf_stem == "attn_k":
            array = _permute(array, cfg.num_key_value_heads)
        gguf_name = f"{gguf_stem}.{suffix}" if layer is None else f"blk.{layer}.{gguf_stem}.{suffix}"
        if array.ndim == 1:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
        else:
            qtype = types(gguf_stem, layer)
            writer.add_tensor(gguf_name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
