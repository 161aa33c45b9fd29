"""GGUF files of every architecture, written by llama.cpp's own converter (``tests/fixtures``), against the
Hugging Face models they were converted from: greedy tokens identical, logprobs within 1e-4, the config
the file implies, the chat template it carries."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from gguf_families import FIXTURES, FOLDER, hf_model  # noqa: E402

NEW_TOKENS = 10

# What the loader must read from each file (beyond the shape): llama.cpp's conventions per architecture.
EXPECTED = {
    "llama": {"family": "llama", "rope_kind": "freq_factors"},  # Llama 3.2: rope_freqs tensor
    "qwen2": {"family": "qwen2", "qkv_bias": True},
    "qwen3": {"family": "qwen3", "qk_norm": True, "head_dim": 32},
    "gemma2": {"family": "gemma2", "sliding_window": 6, "local_layers": (0,), "attn_logit_softcap": 50.0,
               "final_logit_softcap": 30.0, "sandwich_norms": True, "hidden_act": "gelu_tanh"},
    "gemma3": {"family": "gemma3_text", "sliding_window": 6, "local_layers": (0, 1, 2, 3, 4), "qk_norm": True,
               "local_rope_theta": 10000.0, "sandwich_norms": True},
    "phi3": {"family": "phi3", "rotary_dim": 12, "fused_checkpoint": True, "rope_kind": "longrope"},
    "smollm3": {"family": "smollm3", "nope_layers": (3,)},
    "mistral3": {"family": "ministral3", "rope_kind": "yarn"},
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def loaded(request):
    name = request.param
    params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=128, max_num_batched_tokens=24)
    engine = LLMEngine(str(FOLDER / f"{name}.gguf"), params, dtype=torch.float32)
    return name, engine, hf_model(name, engine.config.vocab_size)


def test_config_follows_the_architecture(loaded):
    name, engine, _ = loaded
    cfg = engine.config
    for key, value in EXPECTED[name].items():
        got = (cfg.rope_scaling or {}).get("rope_type") if key == "rope_kind" else getattr(cfg, key)
        assert got == value, (name, key)


def hf_greedy(hf, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                      output_logits=True, return_dict_in_generate=True)  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = torch.cat(out.logits).float().log_softmax(-1)[torch.arange(len(tokens)), tokens].tolist()
    return tokens, logprobs


def test_greedy_matches_the_converted_hf_model(loaded):
    """Prompts shorter and longer than the sliding window, chunked beside decodes, then a prefix-cache hit."""
    name, engine, hf = loaded
    gen = torch.Generator().manual_seed(5)
    lengths = [max(n, FIXTURES[name].min_prompt) for n in (3, 40)]
    prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    prompts.append(prompts[1] + prompts[0])  # its first 40 tokens are cached by now
    results = engine.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=NEW_TOKENS, temperature=0,
                                                 ignore_eos=True) for p in prompts[:2]])  # fmt: skip
    results += engine.generate([GenerationRequest(prompt_token_ids=prompts[2], max_new_tokens=NEW_TOKENS,
                                                  temperature=0, ignore_eos=True)])  # fmt: skip
    assert results[2].num_cached_tokens >= 32
    for prompt, result in zip(prompts, results):
        tokens, logprobs = hf_greedy(hf, prompt)
        assert result.token_ids == tokens, (name, len(prompt))
        assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs)) < 1e-4, name
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_chat_template_comes_from_the_file(loaded):
    name, engine, _ = loaded
    fixture = FIXTURES[name]
    assert engine.tokenizer.hf.chat_template == fixture.template
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Greet the traveller."}])
    text = engine.tokenizer.hf.decode(ids)
    bos = ("<bos>" if fixture.sentencepiece else fixture.specials[0]) if fixture.bos else ""
    assert "Greet the traveller." in text and text.startswith(bos)
    assert engine.eos_token_ids  # the end-of-turn token the template closes turns with


@pytest.mark.parametrize("name", ["qwen3", "smollm3"])
def test_thinking_switch_reaches_the_template(name):
    """Off by default: the reply opens with an empty think block; on: the model may think first."""
    engine = LLMEngine(str(FOLDER / f"{name}.gguf"), GeneratorParams(max_seq_len=128), dtype=torch.float32)
    chat = [{"role": "user", "content": "Which road leads north?"}]

    def prompt(**options) -> str:
        return engine.tokenizer.hf.decode(engine.prompt_ids(GenerationRequest(messages=chat, **options)))

    assert prompt().endswith("<think>\n\n</think>\n" + ("\n" if name == "qwen3" else ""))
    assert prompt(thinking=True).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="thinking"):
        engine.add_request(GenerationRequest(messages=chat, thinking="yes"))


def quantized_copy(source: Path, target: Path, kind: GGMLQuantizationType) -> None:
    """``source`` with every matrix whose rows split into 32-value blocks stored as ``kind`` (gguf-py's
    quantization), metadata and tokenizer unchanged: the fixture as a quantized release would ship it."""
    reader = GGUFReader(source)
    writer = GGUFWriter(target, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            kinds = field.types
            writer.add_key_value(field.name, field.contents(), kinds[0], kinds[-1] if len(kinds) > 1 else None)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        if values.ndim == 2 and values.shape[1] % 32 == 0 and not tensor.name.startswith("rope_"):
            writer.add_tensor(tensor.name, quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Bounds of tests/test_default_model.py, in nats: bfloat16's greedy token below float32's best, and its
# logprob against float32's.
MAX_GAP, MAX_ERROR = 0.5, 0.3


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_quantized_file_in_bfloat16_stays_near_float32(name, tmp_path):
    """A Q8_0 copy of each fixture, run in bfloat16 (on a CPU with AMX its matrices are multiplied straight
    from their blocks) against float32 on the same file."""
    path = tmp_path / f"{name}-q8_0.gguf"
    quantized_copy(FOLDER / f"{name}.gguf", path, GGMLQuantizationType.Q8_0)
    params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=128)
    fast, exact = (LLMEngine(str(path), params, dtype=dtype) for dtype in (torch.bfloat16, torch.float32))
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, exact.config.vocab_size, (max(n, FIXTURES[name].min_prompt),), generator=gen).tolist()
               for n in (5, 40)]  # fmt: skip
    runs = fast.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=8, temperature=0, ignore_eos=True)
                          for p in prompts])  # fmt: skip
    for prompt, run in zip(prompts, runs):
        prefixes = [prompt + run.token_ids[:i] for i in range(len(run.token_ids))]
        best = exact.generate([GenerationRequest(prompt_token_ids=p, max_new_tokens=1, temperature=0)
                               for p in prefixes])  # fmt: skip
        chosen = exact.generate([GenerationRequest(prompt_token_ids=prompt + run.token_ids, max_new_tokens=1,
                                                   prompt_logprobs=True)])[0].prompt_logprobs[len(prompt):]  # fmt: skip
        for i, logprob in enumerate(chosen):
            assert best[i].logprobs[0] - logprob < MAX_GAP, (name, i)
            assert abs(run.logprobs[i] - logprob) < MAX_ERROR, (name, i)
