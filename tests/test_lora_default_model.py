"""A LoRA adapter on the default model (GGUF Q4_1): against HF + peft on the same file, and in bfloat16
(where the CPU multiplies from the file's blocks, the updates are added beside those products)."""

from __future__ import annotations

import pytest
import torch
import transformers

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from gllm.loader.registry import DEFAULT_MODEL, resolve
from gllm.ops.linear import packing_supported
from lora_fixtures import make_adapter

CHAT = [{"role": "user", "content": "Greet the traveller at the city gate."}]
PARAMS = GeneratorParams(block_size=16, max_batch_size=4, max_seq_len=256)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The HF model with a random adapter (peft), the adapter's folder, and the engine's float32 tokens."""
    path = resolve(DEFAULT_MODEL)
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("guard")
    model = make_adapter(base.eval(), folder, seed=3, r=8, std=0.1)
    return model, folder


def test_adapter_on_the_default_model_matches_peft(setup):
    model, folder = setup
    engine = LLMEngine(DEFAULT_MODEL, PARAMS, dtype=torch.float32, adapters={"guard": folder})
    guard, plain = engine.generate([GenerationRequest(messages=CHAT, max_new_tokens=24, temperature=0, adapter=name)
                                    for name in ("guard", None)])  # fmt: skip
    ids = guard.prompt_token_ids
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids) :].tolist()
    assert guard.token_ids == tokens[: len(guard.token_ids)]
    logprobs = torch.cat(out.logits).float().log_softmax(-1)[torch.arange(len(tokens)), tokens].tolist()
    assert max(abs(a - b) for a, b in zip(guard.logprobs, logprobs)) < 1e-3
    assert guard.token_ids != plain.token_ids


def test_adapter_in_bfloat16_stays_near_float32(setup):
    """bfloat16 runs the base products through the fastest kernels this CPU has (GGUF blocks with AMX);
    the adapter's updates are added beside them. Scored on the float32 model's own continuation."""
    if not packing_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 kernels: its bfloat16 engine is the plain torch path, tested elsewhere")
    _, folder = setup
    f32 = LLMEngine(DEFAULT_MODEL, PARAMS, dtype=torch.float32, adapters={"guard": folder})
    text = f32.generate([GenerationRequest(messages=CHAT, max_new_tokens=24, temperature=0, adapter="guard")])[0]
    score = ScoreRequest(messages=CHAT, candidates=[text.token_ids], adapter="guard")
    want = f32.score(score).candidates[0].token_logprobs
    plain = f32.score(ScoreRequest(messages=CHAT, candidates=[text.token_ids])).candidates[0].token_logprobs
    bf16 = LLMEngine(DEFAULT_MODEL, PARAMS, dtype=torch.bfloat16, adapters={"guard": folder})
    got = bf16.score(score).candidates[0].token_logprobs

    def mean_gap(xs, ys):
        return sum(abs(x - y) for x, y in zip(xs, ys)) / len(ys)

    # bfloat16 moves logprobs by about 0.1 nat on average (test_default_model); the adapter by far more
    assert mean_gap(got, want) < min(0.3, mean_gap(plain, want) / 2)
    # Decoding: each token's row goes through the grouped kernels (int8 copies of the adapter in bfloat16).
    decoded = bf16.generate([GenerationRequest(messages=CHAT, max_new_tokens=24, temperature=0, adapter="guard")])[0]
    rescored = ScoreRequest(messages=CHAT, candidates=[decoded.token_ids], adapter="guard")
    want = f32.score(rescored).candidates[0].token_logprobs
    plain = f32.score(ScoreRequest(messages=CHAT, candidates=[decoded.token_ids])).candidates[0].token_logprobs
    assert mean_gap(decoded.logprobs, want) < min(0.3, mean_gap(plain, want) / 2)
