"""Adapter files: llama.cpp's GGUF LoRA equals the same adapter in PEFT files; bad files change nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, build_tiny_llama
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from gllm.lora import AdapterError
from lora_fixtures import make_adapter, peft_to_gguf

CFG = TINY_CONFIGS["gqa_tied_llama3"]
PROMPT = list(range(3, 30))


@pytest.fixture(scope="module")
def setup(gqa_model, tmp_path_factory):
    """An engine on the GQA test model with one adapter ``good`` loaded, and that adapter's folder."""
    folder, hf = gqa_model
    good = tmp_path_factory.mktemp("good")
    make_adapter(hf, good, seed=5)
    params = GeneratorParams(block_size=8, max_batch_size=4, max_seq_len=128)
    return LLMEngine(folder, params, device="cpu", dtype=torch.float32, adapters={"good": good}), good


def greedy(adapter=None) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=8, temperature=0, adapter=adapter)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gguf_lora_equals_peft(setup, tmp_path, dtype):
    engine, good = setup
    path = tmp_path / "good.gguf"
    peft_to_gguf(good, path, CFG["num_attention_heads"], CFG["num_key_value_heads"], dtype)
    from_gguf = engine.load_adapter("from-gguf", path)
    try:
        from_peft = engine.adapters.get("good")
        assert from_gguf.sites.keys() == from_peft.sites.keys()
        tol = 0 if dtype == np.float32 else 2e-3
        for site, want in from_peft.sites.items():
            got = from_gguf.sites[site]
            torch.testing.assert_close(got.a, want.a, atol=tol, rtol=tol)
            for p, q in zip(got.parts, want.parts):
                assert (p.out, p.cols) == (q.out, q.cols)
                torch.testing.assert_close(p.b, q.b, atol=tol, rtol=tol)
        if dtype == np.float32:
            a, b = engine.generate([greedy("good"), greedy("from-gguf")])
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    finally:
        engine.unload_adapter("from-gguf")


def another_base_adapter(tmp_path):
    """An adapter made on a model of another width: every matrix has the wrong shape."""
    other = build_tiny_llama(tmp_path / "other", **dict(CFG, hidden_size=64, num_attention_heads=4))
    make_adapter(other, tmp_path / "wrong", seed=6)
    return tmp_path / "wrong"


def deeper_base_adapter(tmp_path):
    """An adapter made on a model with more layers: its layer 2 does not exist here."""
    other = build_tiny_llama(tmp_path / "deep", **dict(CFG, num_hidden_layers=3))
    make_adapter(other, tmp_path / "deep-lora", seed=7, targets=["down_proj"])
    return tmp_path / "deep-lora"


def copy_of(good, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(good, folder)
    edit(folder)
    return folder


def set_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


def truncate(folder):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


BAD = {
    "missing path": (lambda good, tmp: tmp / "nowhere", "no such file"),
    "folder without config": (lambda good, tmp: copy_of(good, tmp, lambda f: (f / "adapter_config.json").unlink()), "adapter_config.json"),
    "wrong base (shapes)": (lambda good, tmp: another_base_adapter(tmp), "another base model"),
    "wrong base (layers)": (lambda good, tmp: deeper_base_adapter(tmp), "not a projection of this model"),
    "truncated weights": (lambda good, tmp: copy_of(good, tmp, truncate), "not a readable safetensors"),
    "pickle weights": (lambda good, tmp: copy_of(good, tmp, pickle_only), "pickle"),
    "DoRA": (lambda good, tmp: copy_of(good, tmp, set_config(use_dora=True)), "use_dora"),
    "not LoRA": (lambda good, tmp: copy_of(good, tmp, set_config(peft_type="IA3")), "only LORA"),
    "model file as adapter": (lambda good, tmp: write_model_gguf(tmp), "not a LoRA adapter"),
    "other architecture": (lambda good, tmp: gguf_of(good, tmp, arch="qwen2"), "architecture 'qwen2'"),
}


def write_model_gguf(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "model.gguf"


def gguf_of(good, tmp_path, arch):
    path = tmp_path / "adapter.gguf"
    peft_to_gguf(good, path, CFG["num_attention_heads"], CFG["num_key_value_heads"], arch=arch)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_changes_nothing(setup, tmp_path, case):
    engine, good = setup
    make, message = BAD[case]
    before = engine.generate([greedy("good")])[0]
    with pytest.raises(AdapterError, match=message):
        engine.load_adapter("bad", make(good, tmp_path))
    assert sorted(engine.adapters.adapters) == ["good"]
    with pytest.raises(ValueError, match="unknown adapter 'bad'"):
        engine.add_request(greedy("bad"))
    after = engine.generate([greedy("good")])[0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs
    assert engine.stats()["kv_blocks_in_use"] == 0 and not engine.has_work()


def test_names_and_unknown_adapters(setup):
    engine, good = setup
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("good", good)
    with pytest.raises(AdapterError, match="adapter name"):
        engine.load_adapter("no spaces", good)
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_score(ScoreRequest(prompt_token_ids=PROMPT, candidates=[[1]], adapter="missing"))
    with pytest.raises(AdapterError, match="no adapter named"):
        engine.unload_adapter("missing")
    assert not engine.has_work()
