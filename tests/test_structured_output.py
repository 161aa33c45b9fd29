"""Structured output in the engine: JSON Schemas, GBNF and Lark grammars, regular expressions, choices.

A tiny random chat model (``tiny_chat``) writes nonsense, which is the point: whatever it prefers, a
constrained output must still match. Every check of an output is independent of llguidance (the
``jsonschema`` package, Python's ``re``, a small parser for the arithmetic grammar).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_CONFIGS
from gllm.constrain import GrammarLimitError, GrammarLimits
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from tiny_chat import build_chat_model

CHAT = [{"role": "user", "content": "Answer."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("tinychat"), **TINY_CONFIGS["gqa_tied_llama3"])


@pytest.fixture(scope="module")
def engine(model_dir) -> LLMEngine:
    return LLMEngine(str(model_dir), GeneratorParams(max_batch_size=8, max_seq_len=512), dtype="float32")


def run(engine: LLMEngine, reqs: list[GenerationRequest]):
    results = engine.generate(reqs)
    assert engine.stats()["kv_blocks_in_use"] == 0
    return results


def outputs(results):
    return [f for r in results for f in (r.forks or [r])]


# ----------------------------------------------------------------------------------------- JSON Schema
def bounded_number(kind: str):
    return st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": kind, "minimum": t[0], "maximum": t[0] + t[1]})


LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    bounded_number("integer"),
    bounded_number("number"),
    st.lists(st.sampled_from(["red", "green", "blue", 1, 2.5, None, True]), min_size=1, max_size=4,
             unique=True).map(lambda xs: {"enum": xs}),
    st.tuples(st.integers(0, 3), st.integers(0, 6)).map(
        lambda t: {"type": "string", "minLength": t[0], "maxLength": t[0] + t[1]}),
    st.sampled_from([r"^[a-z]{1,5}[0-9]?$", r"^(yes|no)$", r"^[A-Z][a-z]{0,4}( [a-z]{1,3})?$"]).map(
        lambda p: {"type": "string", "pattern": p}),
)


def object_schema(props: dict, required: list[bool]):
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": [k for k, need in zip(props, required) if need]}


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.dictionaries(st.sampled_from(["say", "mood", "a", "b_2", "item"]), inner, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(
            lambda req: object_schema(props, req))),
    st.tuples(inner, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}),
    st.lists(inner, min_size=2, max_size=3).map(lambda options: {"anyOf": options}),
), max_leaves=6).map(lambda s: s if s.get("type") == "object" else object_schema({"value": s}, [True]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_every_finished_json_output_validates(engine, schema, seed):
    jsonschema.Draft202012Validator.check_schema(schema)
    reqs = [GenerationRequest(messages=CHAT, json_schema=schema, temperature=1.0, seed=seed + i, max_new_tokens=120)
            for i in range(2)]
    for r in run(engine, reqs):
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), schema)
            assert r.structure_complete is True
        else:
            assert r.finish_reason == "length"


def test_any_json_object(engine):
    for schema in ({}, True):
        req = GenerationRequest(prompt="x", json_schema=schema, temperature=0.9, seed=2, max_new_tokens=200)
        (r,) = run(engine, [req])
        assert r.text.startswith("{")
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.text), dict)


# ------------------------------------------------------------------------------------------- grammars
def test_gbnf_unicode_escapes_and_token_references(engine):
    eos = "<|im_end|>"
    grammar = 'root ::= "\\u00e9" [\\x41-\\x43\\U0001F600]{2} "\\U0001F600" tail\ntail ::= "!" <|im_end|>'
    (r,) = run(engine, [GenerationRequest(prompt="x", grammar=grammar, temperature=1.0, seed=1)])
    assert re.fullmatch("é[ABC\U0001F600]{2}\U0001F600!", r.text), r.text
    assert r.finish_reason == "stop" and engine.tokenizer.token_text(r.token_ids[-1]) == eos


def test_lark_regex_and_choices(engine):
    lark = 'start: greeting " " NAME "!"\ngreeting: "hello" | "good day"\nNAME: /[A-Z][a-z]{1,6}/'
    regex = r"[0-9]{3}-[a-z]{2,4}"
    choices = ["north", "south", "the old mill"]
    reqs = []
    for temperature in (0.0, 1.0):
        reqs += [GenerationRequest(prompt="x", grammar=lark, grammar_syntax="lark", temperature=temperature, seed=3),
                 GenerationRequest(prompt="x", regex=regex, temperature=temperature, seed=3, n=2),
                 GenerationRequest(prompt="x", choices=choices, temperature=temperature, seed=3, n=3)]
    results = run(engine, reqs)
    for i, r in enumerate(results):
        check = [lambda t: re.fullmatch(r"(hello|good day) [A-Z][a-z]{1,6}!", t),
                 lambda t: re.fullmatch(regex, t), lambda t: t in choices][i % 3]
        for out in r.forks or [r]:
            assert out.finish_reason == "stop" and check(out.text), out.text


def test_forced_tokens_are_reported_with_raw_logprobs(engine):
    """Tokens the grammar forces arrive as ordinary tokens, in order, with the model's own logprobs."""
    choices = ["the old mill by the river", "north"]
    req = GenerationRequest(messages=CHAT, choices=choices, temperature=0.0, logprobs=2)
    before = engine.stats().get("forced_tokens", 0)

    async def stream():
        return [d async for d in engine.stream(req)]

    deltas = asyncio.run(stream())
    assert engine.stats()["forced_tokens"] > before
    assert [d.index for d in deltas] == list(range(len(deltas)))
    text = "".join(d.text for d in deltas)
    assert text in choices
    # The raw model's logprob of each token, from scoring the same tokens after the same prompt.
    ids = [d.token_id for d in deltas]
    scored = engine.score(ScoreRequest(messages=CHAT, candidates=[ids])).candidates[0]
    for delta, lp in zip(deltas, scored.token_logprobs):
        assert delta.logprob == pytest.approx(lp, abs=1e-4)
        assert len(delta.top_logprobs) == 2 and delta.top_logprobs[0][1] >= delta.top_logprobs[1][1]
        assert delta.rank >= 1
    assert deltas[-1].finished


# ---------------------------------------------------------------- stops, aborts, preemption, prefix cache
def test_stop_string_cuts_a_constrained_output(engine):
    (r,) = run(engine, [GenerationRequest(prompt="x", choices=["alpha; beta"], stop=[";"], temperature=0)])
    assert r.text == "alpha" and r.finish_reason == "stop" and r.structure_complete is False


def test_length_cut_says_the_structure_is_incomplete(engine):
    schema = {"type": "object", "properties": {"say": {"type": "string", "minLength": 40}}, "required": ["say"]}
    (r,) = run(engine, [GenerationRequest(prompt="x", json_schema=schema, max_new_tokens=6, temperature=0.5, seed=1)])
    assert r.finish_reason == "length" and r.structure_complete is False
    assert len(r.token_ids) == 6 and r.text.startswith('{"say": "')


def test_abort_in_the_middle_frees_everything(engine):
    long = {"type": "object", "properties": {"say": {"type": "string", "minLength": 200}}}
    victim = engine.add_request(GenerationRequest(prompt="x", json_schema=long, max_new_tokens=300, request_id="v"))
    other = engine.add_request(GenerationRequest(prompt="y", choices=["one", "two"], temperature=0, request_id="o"))
    finished = {}
    steps = 0
    while len(finished) < 2:
        out = engine.step()
        steps += 1
        if steps == 5:
            engine.abort(victim)
        finished.update({r.request_id: r for r in out.finished})
    assert finished[victim].finish_reason == "aborted" and finished[victim].structure_complete is False
    assert finished[other].text in ("one", "two") and finished[other].finish_reason == "stop"
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_preemption_and_prefix_cache_keep_constrained_outputs(model_dir, engine):
    """A KV cache too small for the batch preempts and recomputes; greedy outputs stay those of an engine
    with room, and a second round finds the prompt in the prefix cache."""
    schema = {"type": "object", "properties": {"say": {"type": "string", "maxLength": 30},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["say", "n"], "additionalProperties": False}
    prompt = [{"role": "system", "content": "You are a guard. " * 8}, {"role": "user", "content": "Who goes?"}]

    def reqs():
        return [GenerationRequest(messages=prompt, json_schema=schema, temperature=0.0, max_new_tokens=60,
                                  request_id=f"r{i}") for i in range(4)]

    want = [r.text for r in run(engine, reqs())]
    small = LLMEngine(str(model_dir), GeneratorParams(max_batch_size=4, max_seq_len=512, num_kv_blocks=14),
                      dtype="float32")
    first = [r.text for r in run(small, reqs())]
    assert small.stats()["preemptions"] > 0
    second = run(small, reqs())
    assert first == want == [r.text for r in second]
    assert all(r.num_cached_tokens > 0 for r in second)
    for text in want:
        jsonschema.validate(json.loads(text), schema)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fields, message", [
    (dict(json_schema={"type": "frobnicate"}), "does not compile"),
    (dict(json_schema={"type": "string", "pattern": "(unclosed"}), "does not compile"),
    (dict(json_schema=[1, 2]), "json_schema must be"),
    (dict(grammar='root ::= "a'), "unterminated literal"),
    (dict(grammar="root ::= missing"), "undefined rule"),
    (dict(grammar="start: @@@", grammar_syntax="lark"), "does not compile"),
    (dict(grammar="x", grammar_syntax="ebnf"), "grammar_syntax"),
    (dict(regex="(a"), "does not compile"),
    (dict(choices=[]), "choices must be"),
    (dict(choices=["a"], regex="b"), "at most one"),
    (dict(tools=[{"name": "1bad"}]), "tools[0].name"),
    (dict(tools=[{"name": "a"}], tool_choice="b"), "tool_choice"),
    (dict(tools=[{"name": "a"}], regex="x"), "cannot be combined"),
])
def test_bad_constraints_fail_clearly_and_change_nothing(engine, fields, message):
    running = engine.add_request(GenerationRequest(prompt="x", choices=["steady"], temperature=0, request_id="ok"))
    stats = engine.stats()
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request(GenerationRequest(prompt="x", request_id="bad", **fields))
    assert engine.stats()["waiting"] == stats["waiting"]
    (result,) = engine._run([running])
    assert result.text == "steady"
    assert engine.stats()["kv_blocks_in_use"] == 0
    engine.add_request(GenerationRequest(prompt="x", request_id="bad", max_new_tokens=1))  # the id is free
    engine._run(["bad"])


def test_grammar_limits(model_dir):
    tight = LLMEngine(str(model_dir), GeneratorParams(max_batch_size=2, max_seq_len=256), dtype="float32",
                      grammar_limits=GrammarLimits(max_grammar_size=50))
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20)}}
    with pytest.raises(GrammarLimitError) as info:
        tight.add_request(GenerationRequest(prompt="x", json_schema=schema))
    assert info.value.limit == "max_grammar_size"
    fuel = LLMEngine(str(model_dir), GeneratorParams(max_batch_size=2, max_seq_len=256), dtype="float32",
                     grammar_limits=GrammarLimits(grammar_fuel=1000))
    patterns = {f"p{i}": {"type": "string", "pattern": "[a-z]{3,9}x+"} for i in range(30)}
    with pytest.raises(GrammarLimitError) as info:
        fuel.add_request(GenerationRequest(prompt="x", json_schema={"type": "object", "properties": patterns}))
    assert info.value.limit == "grammar_fuel"
    assert tight.stats()["kv_blocks_in_use"] == fuel.stats()["kv_blocks_in_use"] == 0


def test_a_resumed_generation_goes_on_under_its_grammar(engine):
    """Failover in a cluster: another replica resumes after the tokens already streamed; its matcher takes
    them (forced ones too) and the greedy structure goes on exactly. Tokens the grammar refuses are refused."""
    choices = ["the old mill by the river", "north"]
    (whole,) = run(engine, [GenerationRequest(messages=CHAT, choices=choices, temperature=0.0)])
    given = list(zip(whole.token_ids[:3], whole.logprobs[:3], whole.ranks[:3]))
    (rest,) = run(engine, [GenerationRequest(messages=CHAT, choices=choices, temperature=0.0, resume=given)])
    assert rest.token_ids == whole.token_ids and rest.text == whole.text and rest.structure_complete
    refused = [(engine.tokenizer.encode("zzz", add_special_tokens=False)[0], -1.0, 1)]
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request(GenerationRequest(messages=CHAT, choices=choices, temperature=0.0, resume=refused))
    assert engine.stats()["kv_blocks_in_use"] == 0
