"""Shared fixtures: tiny random Llama checkpoints built with `transformers` (no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import hypothesis
import pytest
import torch
import transformers

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before anything imports
# triton (the Triton tests, and engines built with the triton backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No property test may fail for taking long: the same suite runs on slow and fast machines.
hypothesis.settings.register_profile("gllm", deadline=None)
hypothesis.settings.load_profile("gllm")

# Model files' indexes and tokenizers are cached (gllm.loader.cache): the tests keep theirs out of the
# home folder, in one folder for the session (runtime subprocesses inherit it).
if "GLLM_CACHE_DIR" not in os.environ:
    os.environ["GLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="gllm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GLLM_CACHE_DIR"], ignore_errors=True)

TINY_CONFIGS = {
    # name: LlamaConfig overrides. Large init spreads the logits so greedy choices are never near-ties.
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, tie_word_embeddings=False),
    "gqa_tied_llama3": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_size=128,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mqa_linear": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size=64,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "odd_heads": dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, tie_word_embeddings=True),
}


def build_tiny_llama(folder: Path, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """Save a random tiny Llama to ``folder`` (safetensors + config.json) and return the HF model."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=256,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    config = transformers.LlamaConfig(**kwargs)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    folder = tmp_path_factory.mktemp(request.param)
    return folder, build_tiny_llama(folder, **TINY_CONFIGS[request.param])


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    folder = tmp_path_factory.mktemp("gqa")
    return folder, build_tiny_llama(folder, **TINY_CONFIGS["gqa_tied_llama3"])


@pytest.fixture(scope="session")
def device() -> str:
    """Where engine tests run: the CPU by default, ``GLLM_TEST_DEVICE=cuda`` on a GPU machine."""
    return os.environ.get("GLLM_TEST_DEVICE", "cpu")
