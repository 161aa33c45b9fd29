"""The Python client (``Client``, ``AsyncClient``) against real ``gllm serve`` processes: a tiny random Llama
for most behaviour, and the default model (with its tokenizer and chat template) for text."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gllm.client import AsyncClient, Client, Completion, ServerError, Token
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from runtime_fixtures import build_tiny_llama, dealer, idle, start_server, wait_until


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-client"))


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    srv = start_server(tiny_dir, tmp_path_factory.mktemp("tiny-log"))
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """Greedy completions of the in-process engine, by prompt index."""
    engine = LLMEngine(tiny_dir, GeneratorParams(max_batch_size=8, max_seq_len=2048))
    results = engine.generate([GenerationRequest(prompt_token_ids=ids(i), max_new_tokens=10, temperature=0.0)
                               for i in range(8)])
    return [r.token_ids for r in results]


@pytest.fixture
def client(tiny):
    with Client(tiny.endpoint, timeout=60) as c:
        yield c


def ids(i: int) -> list[int]:
    return [(17 * i + 3 * j + 2) % 256 for j in range(5)]


def test_stream_yields_tokens_then_the_result(client, expected):
    stream = client.generate(prompt_token_ids=ids(0), max_tokens=10, temperature=0, logprobs=2)
    tokens = list(stream)
    assert all(isinstance(t, Token) for t in tokens) and [t.index for t in tokens] == list(range(10))
    assert [t.token_id for t in tokens] == expected[0]
    assert all(len(t.top) == 2 and t.top[0][0] == t.token_id for t in tokens)  # greedy: the best is chosen
    result = stream.result
    assert isinstance(result, Completion) and result.finish_reason == "length"
    assert result.token_ids == expected[0] and result.usage.completion_tokens == 10
    assert result.timing.total_ms is not None and result.timing.ttft_ms is not None
    assert client.complete(prompt_token_ids=ids(0), max_tokens=10, temperature=0).token_ids == expected[0]


def test_interleaved_streams_on_one_client(client, expected):
    streams = [client.generate(prompt_token_ids=ids(i), max_tokens=10, temperature=0) for i in range(4)]
    got: list[list[int]] = [[] for _ in streams]
    live = list(range(4))
    while live:  # read one token from each open stream in turn
        for i in list(live):
            token = next(streams[i], None)
            if token is None:
                live.remove(i)
            else:
                got[i].append(token.token_id)
    assert got == expected[:4]


def test_one_client_shared_by_threads(client, expected):
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        results[i] = client.complete(prompt_token_ids=ids(i), max_tokens=10, temperature=0).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: expected[i] for i in range(4, 8)}


def test_closing_a_stream_cancels_it(client, tiny):
    probe = dealer(tiny.endpoint)
    try:
        with client.generate(prompt_token_ids=ids(1), max_tokens=2000, ignore_eos=True) as stream:
            next(stream)
        wait_until(lambda: idle(probe), timeout=10)
        stream = client.generate(prompt_token_ids=ids(1), max_tokens=2000, ignore_eos=True)
        next(stream)
        stream.cancel()
        assert stream.wait().finish_reason == "cancelled"
    finally:
        probe.close(linger=0)


def test_score_info_ping_and_errors(client):
    scores = client.score(prompt_token_ids=ids(2), candidates=[[1], [2, 3]])
    assert [c.token_ids for c in scores.candidates] == [[1], [2, 3]]
    assert all(c.logprob == pytest.approx(sum(c.token_logprobs)) for c in scores.candidates)
    info = client.info()
    assert info.vocab_size == 256 and info.protocol_version == 1 and "kv_blocks_in_use" in info.stats
    assert client.ping() > 0
    with pytest.raises(ServerError) as err:
        client.complete(prompt_token_ids=[1] * 3000)
    assert err.value.code == "too_long"
    with pytest.raises(ServerError) as err:
        list(client.generate(prompt_token_ids=[999]))
    assert err.value.code == "bad_request" and "vocabulary" in err.value.message
    with pytest.raises(ValueError):
        client.generate("text", prompt_token_ids=[1])  # two prompts: refused before sending


def test_timeout_when_nobody_answers():
    with Client("tcp://127.0.0.1:9", timeout=0.3) as c:  # port 9 (discard): nothing listens
        with pytest.raises(TimeoutError):
            c.ping()
    assert c.closed


def test_async_client_streams_concurrently(tiny, expected):
    async def main() -> None:
        async with AsyncClient(tiny.endpoint, timeout=60) as client:
            async def one(i: int) -> list[int]:
                stream = client.generate(prompt_token_ids=ids(i), max_tokens=10, temperature=0)
                got = [t.token_id async for t in stream]
                assert stream.result.token_ids == got
                return got

            assert await asyncio.gather(*(one(i) for i in range(8))) == expected
            done = await client.complete(prompt_token_ids=ids(3), max_tokens=10, temperature=0)
            assert done.token_ids == expected[3]
            scores = await client.score(prompt_token_ids=ids(2), candidates=[[7]])
            assert len(scores.candidates) == 1
            assert (await client.info()).vocab_size == 256
            assert await client.ping() > 0
            stream = client.generate(prompt_token_ids=ids(4), max_tokens=2000, ignore_eos=True)
            await stream.__anext__()
            await stream.cancel()
            assert (await stream.wait()).finish_reason == "cancelled"
            with pytest.raises(ServerError):
                await client.complete(prompt_token_ids=[1] * 3000)
        assert client.closed

    asyncio.run(main())


# ---------------------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    srv = start_server("smollm2-135m-instruct", tmp_path_factory.mktemp("smol-log"), "--max-seq-len", "512",
                       "--max-batch-size", "4")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_chat_stream_text_is_valid_and_adds_up(smol):
    with Client(smol.endpoint, timeout=120) as client:
        stream = client.generate(messages=[{"role": "user", "content": "Say hello to the blacksmith."}],
                                 max_tokens=12, temperature=0.7, top_p=0.9, seed=3, logprobs=1)
        pieces = [t.text for t in stream]
        result = stream.result
        assert all(isinstance(p, str) for p in pieces) and "".join(pieces) == result.text and result.text
        assert all(isinstance(t.top[0][1], str) for t in result.tokens)
        assert client.info().model == "smollm2-135m-instruct"
        stopped = client.complete("The days of the week are Monday, Tuesday,", max_tokens=12, temperature=0,
                                  stop=[","])
        assert stopped.finish_reason == "stop" and "," not in stopped.text
        scores = client.score("The capital of France is", candidates=[" Paris", " banana"])
        assert scores.candidates[0].logprob > scores.candidates[1].logprob
        with pytest.raises(ServerError) as err:
            client.complete("word " * 600)
        assert err.value.code == "too_long"
