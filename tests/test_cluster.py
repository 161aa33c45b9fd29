"""``gllm serve --replicas 2`` on a local Ray instance, end to end over ZeroMQ, with a tiny model.

One Ray instance for the module, started here with small resources and shut down at the end; the front
end is a real ``gllm serve`` process that joins it with ``--ray-address``, so this process can reach the
replicas' actors (to kill one) while the clients talk protocol v1 as ever. Each result is checked against
one engine in this process: greedy and seeded streams must come out token for token the same.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine, ScoreRequest
from gllm.runtime.protocol import encode
from runtime_fixtures import build_tiny_llama, dealer, read_stream, recv, request, start_server, wait_until

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed (pip install 'gllm[cluster]')")

BATCH = 8
SERVE_ARGS = ("--dtype", "float32", "--max-batch-size", str(BATCH), "--max-seq-len", "2048", "--threads", "1")
SEEDED = dict(temperature=4.0, top_p=0.95, seed=77)  # a wide distribution: draws decide the tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-cluster"))


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """Two LoRA adapters of the tiny model: ``npc`` loaded at start (``--adapter``), ``chess`` at run time."""
    import transformers

    from lora_fixtures import make_adapter

    folder = tmp_path_factory.mktemp("adapters")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    for seed, name in enumerate(("npc", "chess"), start=1):
        make_adapter(hf, folder / name, seed=seed)
    return folder


@pytest.fixture(scope="module")
def cluster(tiny, adapters, ray_address, tmp_path_factory):
    server = start_server(tiny, tmp_path_factory.mktemp("cluster-log"), "--replicas", "2", "--ray-address",
                          ray_address, *SERVE_ARGS, "--adapter", f"npc={adapters / 'npc'}")
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def reference(tiny):
    return LLMEngine(tiny, GeneratorParams(max_batch_size=BATCH, max_seq_len=2048), dtype=torch.float32)


def prompt(i: int) -> list[int]:
    return [(7 * i + 3 * j) % 251 + 1 for j in range(5 + i % 7)]


def replicas(sock, other=None) -> list[dict]:
    """``info``'s replicas; any stream message that arrives before the answer goes to ``other``."""
    sock.send(encode({"type": "info", "id": "info"}))
    while (msg := recv(sock))["type"] != "info":
        assert other is not None, msg
        other(msg)
    return msg["replicas"]


def test_16_concurrent_streams_equal_one_engine_and_use_both_replicas(cluster, reference):
    sock = dealer(cluster.endpoint)
    try:
        for i in range(16):
            sock.send(encode({"type": "generate", "id": i, "prompt_token_ids": prompt(i), "max_tokens": 24 + i,
                              "temperature": 0, "ignore_eos": True}))
        sock.send(encode({"type": "score", "id": "s", "prompt_token_ids": prompt(3), "candidates": [[5, 6], [7]]}))
        tokens: dict = {i: [] for i in range(16)}
        ends: dict = {}
        while len(ends) < 17:
            msg = recv(sock)
            if msg["type"] == "token":
                assert msg["index"] == len(tokens[msg["id"]])  # in order, none lost
                tokens[msg["id"]].append(msg["token_id"])
            else:
                ends[msg["id"]] = msg
        expected = reference.generate([GenerationRequest(prompt_token_ids=prompt(i), max_new_tokens=24 + i,
                                                         temperature=0, ignore_eos=True) for i in range(16)])
        assert [tokens[i] for i in range(16)] == [r.token_ids for r in expected]
        assert all(ends[i]["finish_reason"] == "length" for i in range(16))
        assert len({ends[i]["replica"] for i in range(16)}) == 2  # the load was spread
        scored = reference.score(ScoreRequest(prompt_token_ids=prompt(3), candidates=[[5, 6], [7]]))
        assert ends["s"]["type"] == "scores"
        assert [c["logprob"] for c in ends["s"]["candidates"]] == pytest.approx(
            [c.logprob for c in scored.candidates], abs=1e-3)
        info = request(sock, {"type": "info", "id": "i"})
        assert info["stats"]["replicas_healthy"] == 2 and info["protocol_version"] == 1
    finally:
        sock.close(linger=0)


def test_affinity_keeps_a_conversation_on_one_replica(cluster):
    sock = dealer(cluster.endpoint)
    try:
        # Six turns at once with one NPC's key: by load alone they would be spread over both replicas.
        for i in range(6):
            sock.send(encode({"type": "generate", "id": i, "prompt_token_ids": prompt(i), "max_tokens": 40,
                              "temperature": 0, "affinity": "npc-7"}))
        homes = {read_stream(sock)[1]["replica"] for _ in range(6)}
        assert len(homes) == 1
        later = request(sock, {"type": "score", "id": "s", "prompt_token_ids": prompt(9), "candidates": [[1]],
                               "affinity": "npc-7"})
        assert later["replica"] in homes
        # Without the key, the same six spread out.
        for i in range(6):
            sock.send(encode({"type": "generate", "id": i, "prompt_token_ids": prompt(20 + i), "max_tokens": 40,
                              "temperature": 0}))
        assert len({read_stream(sock)[1]["replica"] for _ in range(6)}) == 2
    finally:
        sock.close(linger=0)


def test_cancel_and_disconnect_free_the_replicas(cluster):
    sock, gone = dealer(cluster.endpoint), dealer(cluster.endpoint)
    try:
        for i in range(2):
            gone.send(encode({"type": "generate", "id": i, "prompt_token_ids": prompt(i), "max_tokens": 1500,
                              "ignore_eos": True, "affinity": f"gone-{i}"}))
        sock.send(encode({"type": "generate", "id": "c", "prompt_token_ids": prompt(5), "max_tokens": 1500,
                          "ignore_eos": True}))
        assert recv(sock)["type"] == "token"
        recv(gone)
        sock.send(encode({"type": "cancel", "id": "c"}))
        tokens, end = read_stream(sock)
        assert end["type"] == "done" and end["finish_reason"] == "cancelled"
        assert end["usage"]["completion_tokens"] == len(tokens) + 1 < 1500
        gone.close(linger=0)
        # The replicas report their engines every second: both end up with nothing running or held.
        wait_until(lambda: all(r["running"] == 0 and r["kv_blocks_in_use"] == 0 and r["open_requests"] == 0
                               for r in replicas(sock)), timeout=60, interval=0.5)
    finally:
        sock.close(linger=0)
        gone.close(linger=0)


def pinned(sock) -> int:
    return request(sock, {"type": "info", "id": "pins"})["stats"]["pinned_states"]


def test_saved_states_go_through_the_replica_of_their_affinity(cluster):
    """Snapshot, restore with a pin, a generation that finds the state, release, and a disconnect that
    releases: all through the replicas, keyed by the NPC's affinity."""
    sock, gone = dealer(cluster.endpoint), dealer(cluster.endpoint)
    chat = [(11 * j) % 251 + 1 for j in range(40)]
    try:
        snap = request(sock, {"type": "snapshot", "id": "s", "prompt_token_ids": chat, "affinity": "npc-2"})
        assert snap["type"] == "snapshot" and snap["tokens"] == 32
        restore = {"type": "restore", "id": "brom", "state": snap["state"], "pin": True, "affinity": "npc-3"}
        assert request(sock, restore) == {"type": "restored", "id": "brom", "tokens": 32, "pinned": True}
        assert request(sock, restore)["code"] == "bad_request"  # that id pins a state already
        sock.send(encode({"type": "generate", "id": "g", "prompt_token_ids": chat + [5], "max_tokens": 4,
                          "temperature": 0, "affinity": "npc-3"}))
        _, done = read_stream(sock)
        assert done["usage"]["cached_tokens"] >= 32
        wait_until(lambda: pinned(sock) == 1, timeout=30, interval=0.5)
        sock.send(encode({"type": "release", "id": "brom"}))
        wait_until(lambda: pinned(sock) == 0, timeout=30, interval=0.5)
        assert request(gone, {**restore, "affinity": "npc-4"})["pinned"] is True
        wait_until(lambda: pinned(sock) == 1, timeout=30, interval=0.5)
        gone.close(linger=0)
        wait_until(lambda: pinned(sock) == 0, timeout=30, interval=0.5)
    finally:
        sock.close(linger=0)
        gone.close(linger=0)


def test_every_replica_serves_the_same_adapters(cluster, tiny, adapters):
    """``--adapter`` loads on every replica; ``load_adapter`` / ``unload_adapter`` go to all of them, so a
    request naming an adapter gets the same tokens wherever it lands."""
    sock = dealer(cluster.endpoint)
    local = LLMEngine(tiny, GeneratorParams(max_batch_size=BATCH, max_seq_len=2048), dtype=torch.float32,
                      adapters={name: adapters / name for name in ("npc", "chess")})
    try:
        assert request(sock, {"type": "info", "id": "i"})["adapters"] == ["npc"]
        loaded = request(sock, {"type": "load_adapter", "id": "l", "name": "chess", "path": str(adapters / "chess")})
        assert loaded == {"type": "adapters", "id": "l", "adapters": ["chess", "npc"]}
        missing = request(sock, {"type": "load_adapter", "id": "m", "name": "x", "path": str(adapters / "nowhere")})
        assert missing["code"] == "bad_request" and "no such file" in missing["message"]
        assert request(sock, {"type": "info", "id": "i"})["adapters"] == ["chess", "npc"]
        for i in range(6):  # at once, without a key: both replicas take some
            sock.send(encode({"type": "generate", "id": i, "prompt_token_ids": prompt(30 + i), "max_tokens": 40,
                              "temperature": 0, "ignore_eos": True, "adapter": ("npc", "chess")[i % 2]}))
        tokens: dict[int, list[int]] = {i: [] for i in range(6)}
        homes = {}
        while len(homes) < 6:
            msg = recv(sock)
            if msg["type"] == "token":
                tokens[msg["id"]].append(msg["token_id"])
            else:
                assert msg["type"] == "done", msg
                homes[msg["id"]] = msg["replica"]
        for i in range(6):
            want = local.generate([GenerationRequest(prompt_token_ids=prompt(30 + i), max_new_tokens=40, temperature=0,
                                                     ignore_eos=True, adapter=("npc", "chess")[i % 2])])[0]
            assert tokens[i] == want.token_ids
        assert len(set(homes.values())) == 2
        assert request(sock, {"type": "unload_adapter", "id": "u", "name": "chess"})["adapters"] == ["npc"]
        gone = request(sock, {"type": "generate", "id": "g", "prompt_token_ids": [1, 2], "adapter": "chess"})
        assert gone["code"] == "bad_request" and "unknown adapter 'chess'" in gone["message"]
    finally:
        sock.close(linger=0)


def test_a_killed_replica_s_streams_go_on_elsewhere(cluster, reference, ray_address):
    import ray

    sock = dealer(cluster.endpoint)
    try:
        common = dict(prompt_token_ids=prompt(11), max_tokens=1500, ignore_eos=True, affinity="doomed")
        sock.send(encode({"type": "generate", "id": "greedy", "temperature": 0, **common}))
        sock.send(encode({"type": "generate", "id": "seeded", **SEEDED, **common}))
        tokens: dict = {"greedy": [], "seeded": []}
        ends: dict = {}

        def take(msg):
            if msg["type"] == "token":
                assert msg["index"] == len(tokens[msg["id"]])  # consecutive across the failover
                tokens[msg["id"]].append(msg["token_id"])
            else:
                ends[msg["id"]] = msg

        while min(map(len, tokens.values())) < 20:
            take(recv(sock))
        doomed = next(r["id"] for r in replicas(sock, take) if r["open_requests"] == 2)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::gllm#EngineReplica#{doomed}", namespace="serve"))
        while len(ends) < 2:
            take(recv(sock))
        settings = {"greedy": dict(temperature=0), "seeded": SEEDED}
        for name in ("greedy", "seeded"):
            expected = reference.generate([GenerationRequest(prompt_token_ids=prompt(11), max_new_tokens=1500,
                                                             ignore_eos=True, **settings[name])])[0]
            assert ends[name]["type"] == "done" and ends[name]["finish_reason"] == "length", ends[name]
            assert ends[name]["replica"] != doomed and ends[name]["usage"]["completion_tokens"] == 1500
            assert tokens[name] == expected.token_ids, name
        info = request(sock, {"type": "info", "id": "i"})
        assert info["stats"]["failovers"] >= 1
        # Serve starts a replica in place of the dead one.
        wait_until(lambda: request(sock, {"type": "info", "id": "i"})["stats"]["replicas_healthy"] == 2,
                   timeout=300, interval=1)
    finally:
        sock.close(linger=0)


def test_serve_without_replicas_does_not_import_ray():
    code = ("import sys, gllm.cli, gllm.runtime.server; gllm.cli.build_parser().parse_args(['serve']); "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
