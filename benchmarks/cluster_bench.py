"""The cluster (``gllm serve --replicas N`` on Ray Serve) against one ``gllm serve``: what the front end adds
to each token, what cache-aware routing keeps of the prefix cache, and how long a failover takes.

One local Ray instance for the whole run (started here, small resources, no dashboard); each cluster is a
``gllm serve --replicas N --ray-address ...`` process, so this process can kill a replica's actor.

* **Front-end overhead per token**: 16 greedy streams of 64 new tokens (random 128-token prompts, all
  sent at once over one ``AsyncClient``), through one ``gllm serve --threads 2`` and through a cluster of
  one replica with the same two threads. Per token: the time the client's ``async for`` yields it minus
  the time the engine handed it out (``cluster_trace.py`` stamps it inside the serving process, on the
  clock all processes of the machine share). The cluster's extra over the single runtime is the front
  end's cost: the replica's engine thread to its event loop, Ray's streaming, the relay and its ZeroMQ
  socket. p50 and p99 over every token of ``--runs`` runs after one warm-up.
* **Prefix-cache hit rate on the village workload**: the NPC village (``examples/npc_dialogue``, as in
  ``village.py`` but with memories on, so conversations grow turn by turn) on two replicas, routed with
  affinity (each NPC's name as its key) and round-robin. Hit rate = prompt tokens served from the cache /
  prompt tokens, over every answer after the priming.
* **Failover time**: one greedy stream on a replica that is then killed (``ray.kill``) after 30 tokens:
  from the kill to the client's next token (the stream then continues on the other replica), against the
  stream's usual gap between tokens. ``--kills`` times, each after Serve has replaced the dead replica.

On a 2-core machine the replicas share the same two cores, so throughput cannot grow with replicas here;
docs/cluster.md gives the scaling argument.

    python benchmarks/cluster_bench.py            # writes benchmarks/results/cluster.{json,md}
    python benchmarks/cluster_bench.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "npc_dialogue"))

import cluster_trace  # noqa: E402
from common import machine_info, markdown_table, percentile, resolved_dtype, write_results  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["Which road leads to Highmoor castle?", "Has a grey horse passed this way?",
             "What do you think of Lady Orla?", "Is it safe outside the wall tonight?",
             "Who could guide me through the forest?", "Where can I sleep tonight?"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="measured overhead runs per system")
    p.add_argument("--npcs", type=int, default=7, help="odd, so that round-robin does not happen to send each "
                   "NPC to the same one of two replicas every turn")
    p.add_argument("--rounds", type=int, default=4, help="player lines in the village")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one run, 3 NPCs, 2 rounds, one kill")
    p.add_argument("--out", default=str(HERE / "results" / "cluster"))
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.npcs, args.rounds, args.kills = 1, 3, 2, 1
    return args


# ------------------------------------------------------------------------------------- processes
class Serving:
    """A ``gllm serve`` process (single or cluster) on a free port, stopped with SIGTERM."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*argv, "--bind", self.endpoint], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        self.log = log
        from gllm.client import Client

        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gllm serve did not start:\n{log.read_text()[-3000:]}")
            try:
                with Client(self.endpoint, timeout=2) as c:
                    c.ping()
                return
            except Exception:
                time.sleep(1)

    def replicas(self) -> list[dict[str, Any]]:
        from gllm.client import Client

        with Client(self.endpoint, timeout=60) as c:
            return c.info().replicas

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def gllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "gllm", "serve", "--model", MODEL, *args]


def cluster(address: str, replicas: int, threads: int, *args: str) -> list[str]:
    return gllm("--replicas", str(replicas), "--threads", str(threads), "--ray-address", address, *args)


# ------------------------------------------------------------------------------- overhead per token
async def stream_all(endpoint: str, prompts: list[list[int]], new_tokens: int) -> dict[tuple, float]:
    from gllm.client import AsyncClient

    received: dict[tuple, float] = {}
    async with AsyncClient(endpoint, timeout=600) as client:
        async def one(ids: list[int]) -> None:
            stream = client.generate(prompt_token_ids=ids, max_tokens=new_tokens, temperature=0, ignore_eos=True)
            async for token in stream:
                received[(stream.id, token.index)] = time.perf_counter()

        await asyncio.gather(*(one(p) for p in prompts))
    return received


def overhead(args: argparse.Namespace, address: str, tmp: Path) -> dict[str, Any]:
    systems = {
        "gllm serve": [sys.executable, str(HERE / "cluster_trace.py"), "serve", "--model", MODEL, "--threads", "2"],
        "cluster, 1 replica": cluster(address, 1, 2),
    }
    rng = random.Random(0)
    out = {}
    for name, argv in systems.items():
        trace = Path(tempfile.mkdtemp(dir=tmp))
        path = os.pathsep.join([str(HERE), str(HERE.parent)])  # this folder's trace hook, this checkout's gllm
        job = {"runtime_env": {"worker_process_setup_hook": "cluster_trace.install",
                               "env_vars": {"GLLM_TOKEN_TRACE": str(trace), "PYTHONPATH": path}}}
        env = {"GLLM_TOKEN_TRACE": str(trace), "PYTHONPATH": path, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
        server = Serving(argv + ["--max-batch-size", "16"], tmp / f"{name}.log", env)
        added: list[float] = []
        try:
            for run in range(args.runs + 1):  # run 0 warms up
                for old in trace.glob("*.jsonl"):  # each run's client numbers its requests from 1 again
                    old.unlink()
                prompts = [[rng.randrange(1, 49152) for _ in range(128)] for _ in range(16)]
                received = asyncio.run(stream_all(server.endpoint, prompts, 64))
                if run == 0:
                    continue
                time.sleep(1)  # the serving process appends its last stamps after the step
                stamps = cluster_trace.read(trace)
                added += [(t - stamps[key]) * 1000 for key, t in received.items() if key in stamps]
        finally:
            server.stop()
        out[name] = {"tokens": len(added), "p50_ms": percentile(added, 50), "p99_ms": percentile(added, 99),
                     "mean_ms": statistics.fmean(added)}
        print(f"{name}: added latency per token p50 {out[name]['p50_ms']:.2f} ms, p99 {out[name]['p99_ms']:.2f} ms "
              f"over {len(added)} tokens", flush=True)
    return out


# --------------------------------------------------------------------------------- village hit rate
async def village_run(endpoint: str, npcs: int, rounds: int) -> dict[str, Any]:
    from crowd import Sampling, Village
    from display import Silent
    from gllm.client import AsyncClient
    from npcs import make_crowd

    async with AsyncClient(endpoint, timeout=900) as client:
        village = Village(client, make_crowd(npcs), Silent(), Sampling(max_tokens=32, seed=1, ignore_eos=True),
                          history_budget=256)
        await village.prime()
        answers = []
        for r in range(rounds):
            exchange = await village.say(QUESTIONS[r % len(QUESTIONS)])
            answers += [x.result.usage for x in exchange.replies]
    prompt = sum(u.prompt_tokens for u in answers)
    cached = sum(u.cached_tokens for u in answers)
    return {"answers": len(answers), "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / prompt}


def village(args: argparse.Namespace, address: str, tmp: Path) -> dict[str, Any]:
    out = {}
    for routing in ("affinity", "round-robin"):
        server = Serving(cluster(address, 2, 1, "--routing", routing, "--max-batch-size", "16"),
                         tmp / f"village-{routing}.log")
        try:
            out[routing] = asyncio.run(village_run(server.endpoint, args.npcs, args.rounds))
        finally:
            server.stop()
        print(f"village, {routing}: hit rate {out[routing]['hit_rate']:.1%} "
              f"({out[routing]['cached_tokens']} of {out[routing]['prompt_tokens']} prompt tokens)", flush=True)
    return out


# ---------------------------------------------------------------------------------------- failover
def failover(args: argparse.Namespace, address: str, tmp: Path) -> dict[str, Any]:
    import ray
    import zmq

    from gllm.runtime.protocol import decode, encode

    server = Serving(cluster(address, 2, 1), tmp / "failover.log")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(server.endpoint)
    kills = []
    try:
        for k in range(args.kills):
            while sum(r["healthy"] for r in server.replicas()) < 2:
                time.sleep(1)
            sock.send(encode({"type": "generate", "id": k, "prompt": "Tell me a long story about the mill.",
                              "max_tokens": 200, "temperature": 0, "ignore_eos": True, "affinity": f"k{k}"}))
            times, indexes, killed_at = [], [], None
            while True:
                msg = decode(sock.recv())
                if msg["type"] != "token":
                    break
                times.append(time.perf_counter())
                indexes.append(msg["index"])
                if len(times) == 30:
                    doomed = next(r["id"] for r in server.replicas() if r["open_requests"])
                    killed_at = time.perf_counter()
                    ray.kill(ray.get_actor(f"SERVE_REPLICA::gllm#EngineReplica#{doomed}", namespace="serve"))
            assert indexes == list(range(200)) and msg["type"] == "done" and msg["replica"] != doomed, msg
            after = next(t for t in times if t > killed_at)
            gaps = [(b - a) * 1000 for a, b in zip(times[1:29], times[2:30])]
            kills.append({"failover_ms": (after - killed_at) * 1000, "usual_gap_ms": statistics.median(gaps)})
            print(f"kill {k}: next token {kills[-1]['failover_ms']:.0f} ms after the kill "
                  f"(usual gap {kills[-1]['usual_gap_ms']:.0f} ms)", flush=True)
    finally:
        sock.close(linger=0)
        server.stop()
    return {"kills": kills, "failover_ms_median": statistics.median(k["failover_ms"] for k in kills)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False,
                 _temp_dir=str(tmp / "ray"))
        try:
            address = ray.get_runtime_context().gcs_address
            results = {"overhead": overhead(args, address, tmp), "village": village(args, address, tmp),
                       "failover": failover(args, address, tmp)}
        finally:
            ray.shutdown()
    load_after = os.getloadavg()
    machine = machine_info(("torch", "ray", "pyzmq"))
    ov, vi, fo = results["overhead"], results["village"], results["failover"]
    rows_ov = [[name, r["tokens"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"] for name, r in ov.items()]
    rows_vi = [[name, r["answers"], r["prompt_tokens"], r["cached_tokens"], f"{r['hit_rate']:.1%}"]
               for name, r in vi.items()]
    rows_fo = [[i, f"{k['failover_ms']:.0f}", f"{k['usual_gap_ms']:.0f}"] for i, k in enumerate(fo["kills"])]
    markdown = "\n".join([
        "# Cluster: front-end overhead, cache-aware routing, failover",
        "",
        f"{time.strftime('%Y-%m-%d')}, {MODEL} in {resolved_dtype('auto')} (dtype auto), {machine['cpu']}, "
        f"{machine['usable_cores']} usable cores, Ray {machine.get('ray')}, one local Ray instance. Overhead: one "
        f"gllm serve --threads 2 against a cluster of one replica with 2 threads; village and failover: 2 replicas "
        f"of 1 thread each. Load average before / after: {[round(x, 2) for x in load_before]} / "
        f"{[round(x, 2) for x in load_after]}. Command: `python benchmarks/cluster_bench.py`"
        f"{' --quick' if args.quick else ''}.",
        "",
        f"## Latency added per token, engine to client (16 streams x 64 tokens, batch 16, {args.runs} runs)",
        markdown_table(["system", "tokens", "p50 (ms)", "p99 (ms)"], rows_ov),
        "",
        f"## Prefix-cache hit rate, village with memories ({args.npcs} NPCs, {args.rounds} lines, 2 replicas)",
        markdown_table(["routing", "answers", "prompt tokens", "from cache", "hit rate"], rows_vi),
        "",
        "## Failover: a replica killed mid-stream (2 replicas, 1 thread each)",
        markdown_table(["kill", "kill to next token (ms)", "usual gap between tokens (ms)"], rows_fo),
        "",
        "Both replicas share this machine's 2 cores: throughput cannot grow with replicas here.",
    ])
    data = {"machine": machine, "settings": vars(args), "load_before": load_before, "load_after": load_after,
            "results": results}
    json_path, md_path = write_results(args.out, data, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
