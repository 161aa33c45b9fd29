"""LoRA adapters through ``gllm serve``: --adapter at start, load/unload at run time, per-request adapter."""

from __future__ import annotations

import asyncio

import pytest
import transformers

from gllm.client import AsyncClient, Client, ServerError
from gllm.engine import GenerationRequest, LLMEngine
from lora_fixtures import make_adapter
from runtime_fixtures import build_tiny_llama, dealer, free_port, request, start_server

PROMPT = list(range(5, 25))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A runtime on a tiny model started with adapter ``npc``; a second adapter on disk; the model folder."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny"))
    hf = transformers.LlamaForCausalLM.from_pretrained(folder)
    adapters = tmp_path_factory.mktemp("adapters")
    make_adapter(hf, adapters / "npc", seed=1)
    make_adapter(hf, adapters / "chess", seed=2, targets=["q_proj", "v_proj"], r=8)
    srv = start_server(folder, tmp_path_factory.mktemp("log"), "--adapter", f"npc={adapters / 'npc'}")
    yield srv, folder, adapters
    assert srv.stop() == 0


def local_tokens(folder, adapters, name):
    """The same greedy request in-process, for comparison."""
    engine = LLMEngine(folder, adapters={name: adapters / name} if name else None)
    req = GenerationRequest(prompt_token_ids=PROMPT, max_new_tokens=10, temperature=0, adapter=name)
    return engine.generate([req])[0].token_ids


def test_adapters_per_request_and_at_run_time(setup):
    srv, folder, adapters = setup
    with Client(srv.endpoint) as client:
        assert client.info().adapters == ["npc"]
        tokens = {name: [t.token_id for t in client.generate(prompt_token_ids=PROMPT, max_tokens=10, temperature=0,
                                                             adapter=name)]
                  for name in ("npc", None)}  # fmt: skip
        assert tokens["npc"] == local_tokens(folder, adapters, "npc")
        assert tokens[None] == local_tokens(folder, adapters, None) != tokens["npc"]
        assert client.load_adapter("chess", str(adapters / "chess")) == ["chess", "npc"]
        chess = client.score(prompt_token_ids=PROMPT, candidates=[[1, 2], [3]], adapter="chess")
        plain = client.score(prompt_token_ids=PROMPT, candidates=[[1, 2], [3]])
        assert chess.candidates[0].logprob != plain.candidates[0].logprob
        assert client.unload_adapter("chess") == ["npc"]
        with pytest.raises(ServerError, match="unknown adapter 'chess'") as err:
            client.score(prompt_token_ids=PROMPT, candidates=[[1]], adapter="chess")
        assert err.value.code == "bad_request"
        for name, path, message in [("bad", adapters / "nowhere", "no such file"),
                                    ("npc", adapters / "chess", "already loaded")]:  # fmt: skip
            with pytest.raises(ServerError, match=message) as err:
                client.load_adapter(name, str(path))
            assert err.value.code == "bad_request"
        with pytest.raises(ServerError, match="no adapter named") as err:
            client.unload_adapter("ghost")
        assert client.info().adapters == ["npc"]
        assert client.info().stats["kv_blocks_in_use"] == 0


def test_async_client_and_raw_messages(setup):
    srv, folder, adapters = setup

    async def run():
        async with AsyncClient(srv.endpoint) as client:
            done = await client.complete(prompt_token_ids=PROMPT, max_tokens=10, temperature=0, adapter="npc")
            return [t.token_id for t in done.tokens], (await client.info()).adapters

    tokens, names = asyncio.run(run())
    assert names == ["npc"] and tokens == local_tokens(folder, adapters, "npc")
    sock = dealer(srv.endpoint)
    try:
        for message, text in [({"type": "generate", "id": 1, "prompt_token_ids": [1], "adapter": 7}, "must be a string"),
                              ({"type": "load_adapter", "id": 2, "name": "x"}, "needs the field 'path'"),
                              ({"type": "unload_adapter", "id": 3, "name": ""}, "must not be empty")]:  # fmt: skip
            reply = request(sock, message)
            assert reply["type"] == "error" and reply["code"] == "bad_request" and text in reply["message"]
    finally:
        sock.close()


def test_network_runtime_without_authentication_refuses_to_read_files(setup, tmp_path):
    _, folder, adapters = setup
    srv = start_server(folder, tmp_path, "--insecure", endpoint=f"tcp://0.0.0.0:{free_port()}")
    try:
        with Client(srv.endpoint.replace("0.0.0.0", "127.0.0.1")) as client:
            with pytest.raises(ServerError, match="may not make it read files") as err:
                client.load_adapter("npc", str(adapters / "npc"))
            assert err.value.code == "forbidden" and client.info().adapters == []
    finally:
        assert srv.stop() == 0
