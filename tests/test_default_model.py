"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers loading the same file."""

from __future__ import annotations

import pytest
import torch
import transformers

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from gllm.loader.registry import DEFAULT_MODEL, resolve

CHATS = [
    "What is the capital of France?",
    "Write a haiku about a blacksmith.",
    "Give me three tips for a knight guarding a castle gate.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(DEFAULT_MODEL, GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=512), dtype=torch.float32)


@pytest.fixture(scope="module")
def hf():
    path = resolve(DEFAULT_MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def chat_ids(tokenizer, text: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def test_greedy_chat_matches_hf(engine, hf):
    model, tokenizer = hf
    reqs = [GenerationRequest(messages=[{"role": "user", "content": c}], max_new_tokens=32, temperature=0) for c in CHATS]
    results = engine.generate(reqs)
    for chat, r in zip(CHATS, results):
        ids = chat_ids(tokenizer, chat)
        assert r.prompt_token_ids == ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        n = len(r.token_ids)  # the engine stops at <|im_end|> like HF does
        assert r.token_ids == out[:n], chat
        assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_scores_match_hf(engine, hf):
    model, tokenizer = hf
    prompt = "1. e4 e5 2. Nf3"
    cands = [" Nc6", " d6", " Qh4", " a6", " Nf6"]
    result = engine.score(ScoreRequest(prompt=prompt, candidates=cands))
    prompt_ids = tokenizer(prompt)["input_ids"]
    for cand, score in zip(cands, result.candidates):
        cand_ids = tokenizer(cand, add_special_tokens=False)["input_ids"]
        assert score.text == cand and score.token_ids == cand_ids
        ids = prompt_ids + cand_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        expected = logp[torch.arange(len(prompt_ids) - 1, len(ids) - 1), torch.tensor(cand_ids)]
        assert torch.allclose(torch.tensor(score.token_logprobs), expected, atol=1e-4)


def test_candidate_tokenization_rule(engine):
    """Candidates are tokenized alone and appended: ' e4' and 'e4' are different continuations."""
    tok = engine.tokenizer
    result = engine.score(ScoreRequest(prompt="1.", candidates=[" e4", "e4"]))
    assert result.candidates[0].token_ids == tok.encode(" e4", add_special_tokens=False)
    assert result.candidates[1].token_ids == tok.encode("e4", add_special_tokens=False)
    assert result.candidates[0].token_ids != result.candidates[1].token_ids
    as_ids = engine.score(ScoreRequest(prompt="1.", candidates=[c.token_ids for c in result.candidates]))
    assert [c.logprob for c in as_ids.candidates] == pytest.approx([c.logprob for c in result.candidates], abs=1e-5)


def test_stop_strings_and_streamed_text(engine):
    req = GenerationRequest(prompt="Count: one, two, three, four, five,", max_new_tokens=40, temperature=0)
    full = engine.generate([req])[0]
    stop = full.text[5:9]
    assert stop.strip()
    engine.add_request(GenerationRequest(prompt=req.prompt, max_new_tokens=40, temperature=0, stop=[stop]))
    deltas, result = [], None
    while result is None:
        out = engine.step()
        deltas += out.deltas
        result = out.finished[0] if out.finished else None
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)]
    assert "".join(d.text for d in deltas) == result.text  # held-back text never leaks the stop string
    assert engine.stats()["kv_blocks_in_use"] == 0
