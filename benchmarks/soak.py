"""Soak: many clients for a long time against a real ``gllm serve``, looking for crashes, leaks and hangs.

``--clients`` connections (64 by default) run for ``--minutes`` (30 by default), each picking one action
after another at random:

* **stream**: a generation of 8 to 64 tokens, read to its ``done`` (its time to first token is measured);
* **score**: 2 to 8 candidates;
* **cancel**: a long generation, cancelled after a few tokens, read to its ``done``;
* **disconnect**: a long generation, and the connection closed after a few tokens (a new one follows);
* **slow reader**: a generation read one reply at a time, 50 to 300 ms apart;
* **garbage**: a message the runtime must refuse (from the protocol fuzzer), answered by one ``error``.

Every reply is checked against the protocol (``tests/protocol_fuzzer.py``). The script reports: whether
the runtime crashed; protocol problems and replies that never came (60 s); the runtime's resident memory
(VmRSS from ``/proc/PID/status``) over time; KV blocks still in use once every client has gone
(``info`` stats: anything above 0 is a leak); the exit code of its SIGTERM shutdown; and the time to first
token (p50, p99) of the streams, as the clients saw it. The runtime serves a tiny random Llama unless
``--model`` names another (e.g. ``smollm2-135m-instruct``); prompts are random token ids.

    python benchmarks/soak.py                              # 64 clients, 30 minutes: results/soak.{json,md}
    python benchmarks/soak.py --minutes 2 --out benchmarks/results/soak_2min
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `common` beside this file, run as a script
sys.path.insert(0, str(HERE.parent / "tests"))  # the fuzzer and the server helpers the tests use

from common import machine_info, markdown_table, percentile, write_results  # noqa: E402

ACTIONS = {"stream": 35, "score": 15, "cancel": 15, "disconnect": 10, "slow_reader": 10, "garbage": 15}
REPLY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--model", default=None, help="model to serve (default: a tiny random Llama built here)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--sample-seconds", type=float, default=10.0, help="how often memory and stats are read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "soak"))
    return p.parse_args(argv)


class Problem(Exception):
    """A reply that breaks the protocol, or one that never came."""


class Tally:
    def __init__(self) -> None:
        self.actions: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()  # error codes for well-formed requests
        self.ttft_ms: list[float] = []
        self.score_ms: list[float] = []
        self.problems: list[str] = []


class SoakClient:
    """One connection doing random actions until the deadline, each read to its end before the next."""

    def __init__(self, name: int, endpoint: str, vocab: int, limits: Any, tally: Tally, seed: int):
        import zmq.asyncio

        from protocol_fuzzer import MessageMaker

        self.name, self.endpoint, self.vocab, self.limits, self.tally = name, endpoint, vocab, limits, tally
        self.rng = random.Random(seed)
        self.context = zmq.asyncio.Context.instance()
        self.maker = MessageMaker(self.rng, vocab, limits)
        self.serial = 0
        self.sock = self._connect()

    def _connect(self) -> Any:
        import zmq

        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            action = self.rng.choices(list(ACTIONS), list(ACTIONS.values()))[0]
            try:
                await getattr(self, action)()
                self.tally.actions[action] += 1
            except Problem as exc:
                self.tally.problems.append(f"client {self.name}, {action}: {exc}")
                self.sock.close(linger=0)  # a fresh connection, so a late reply cannot confuse the next action
                self.sock = self._connect()
        self.sock.close(linger=0)

    # ---------------------------------------------------------------------------------------- actions
    async def stream(self) -> None:
        start = time.perf_counter()
        arrivals, _ = await self._generate(self.rng.randint(8, 64))
        if arrivals:
            self.tally.ttft_ms.append((arrivals[0] - start) * 1000)

    async def score(self) -> None:
        rid = self._id()
        start = time.perf_counter()
        candidates = [self._tokens(1, 6) for _ in range(self.rng.randint(2, 8))]
        await self._send({"type": "score", "id": rid, "prompt_token_ids": self._tokens(4, 64),
                          "candidates": candidates})
        reply = await self._recv(rid)
        if reply["type"] == "scores":
            self.tally.score_ms.append((time.perf_counter() - start) * 1000)
        elif reply["type"] == "error":
            self.tally.errors[reply["code"]] += 1
        else:
            raise Problem(f"a {reply['type']!r} reply to a score")

    async def cancel(self) -> None:
        await self._generate(200, cancel_after=self.rng.randint(1, 5))

    async def disconnect(self) -> None:
        rid = await self._start(200)
        for _ in range(self.rng.randint(0, 4)):
            if (await self._recv(rid))["type"] != "token":
                break
        self.sock.close(linger=0)
        self.sock = self._connect()

    async def slow_reader(self) -> None:
        await self._generate(self.rng.randint(8, 32), pause=(0.05, 0.3))

    async def garbage(self) -> None:
        from protocol_fuzzer import expectation

        while True:
            frames = self.maker.next()
            expect, rid = expectation(frames, self.limits)
            if expect == "error" and frames:
                break
        await self.sock.send_multipart(frames)
        reply = await self._recv(rid)
        if reply["type"] != "error":
            raise Problem(f"a {reply['type']!r} reply to a message the runtime must refuse: {frames[0][:60]!r}")

    # ----------------------------------------------------------------------------------------- plumbing
    async def _generate(self, max_tokens: int, cancel_after: int | None = None,
                        pause: tuple[float, float] | None = None) -> tuple[list[float], dict[str, Any]]:
        """Token arrival times and the final reply of one generation."""
        rid = await self._start(max_tokens)
        arrivals: list[float] = []
        while True:
            reply = await self._recv(rid)
            if reply["type"] != "token":
                break
            if reply["index"] != len(arrivals):
                raise Problem(f"token index {reply['index']}, expected {len(arrivals)}")
            arrivals.append(time.perf_counter())
            if len(arrivals) == cancel_after:
                await self._send({"type": "cancel", "id": rid})
            if pause:
                await asyncio.sleep(self.rng.uniform(*pause))
        if reply["type"] == "error":
            self.tally.errors[reply["code"]] += 1
        elif reply["type"] != "done":
            raise Problem(f"a {reply['type']!r} reply ended a generation")
        return arrivals, reply

    async def _start(self, max_tokens: int) -> str:
        rid = self._id()
        await self._send({"type": "generate", "id": rid, "prompt_token_ids": self._tokens(4, 64),
                          "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True,
                          "seed": self.rng.randrange(2**32)})
        return rid

    async def _send(self, message: dict[str, Any]) -> None:
        from gllm.runtime.protocol import encode

        await self.sock.send(encode(message))

    async def _recv(self, rid: Any) -> dict[str, Any]:
        from gllm.runtime.protocol import decode
        from protocol_fuzzer import reply_problem

        try:
            msg = decode(await asyncio.wait_for(self.sock.recv(), REPLY_TIMEOUT_S))
        except asyncio.TimeoutError:
            raise Problem(f"no reply within {REPLY_TIMEOUT_S:g} s (request {rid!r})") from None
        problem = reply_problem(msg) or (None if msg.get("id") == rid else f"id {msg.get('id')!r}, expected {rid!r}")
        if problem:
            raise Problem(f"{problem}: {str(msg)[:200]}")
        return msg

    def _id(self) -> str:
        self.serial += 1
        return f"c{self.name}-{self.serial}"

    def _tokens(self, lo: int, hi: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(lo, hi))]


# ------------------------------------------------------------------------------------------------ the run
def resident_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Probe:
    """A separate connection for ``info``: the runtime's stats while the clients run, and after."""

    def __init__(self, endpoint: str):
        import zmq.asyncio

        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def info(self) -> dict[str, Any]:
        from gllm.runtime.protocol import decode, encode

        await self.sock.send(encode({"type": "info", "id": "probe"}))
        return decode(await asyncio.wait_for(self.sock.recv(), REPLY_TIMEOUT_S))


async def soak(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    from gllm.runtime.limits import ServerLimits

    probe = Probe(server.endpoint)
    info = await probe.info()
    known = ServerLimits.__dataclass_fields__
    limits = ServerLimits(**{k: v for k, v in info["limits"].items() if k in known})
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.minutes * 60
    clients = [SoakClient(i, server.endpoint, info["vocab_size"], limits, tally, args.seed * 1000 + i)
               for i in range(args.clients)]
    tasks = [asyncio.create_task(c.run(deadline)) for c in clients]
    samples, crashed = [], False
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=args.sample_seconds)
        if server.proc.poll() is not None:
            crashed = True
            break
        stats = (await probe.info())["stats"]
        samples.append({"seconds": round(time.monotonic() - start, 1), "rss_kib": resident_kib(server.proc.pid),
                        **{k: stats[k] for k in ("kv_blocks_in_use", "running", "waiting", "open_requests")}})
        print(f"{samples[-1]}  problems so far: {len(tally.problems)}", flush=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    final = None
    if not crashed:  # every client has gone: wait for the runtime to let go of everything
        settle_by = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            final = (await probe.info())["stats"]
            if not any(final[k] for k in ("kv_blocks_in_use", "running", "waiting", "open_requests")):
                break
            if time.monotonic() > settle_by:
                break
            await asyncio.sleep(0.2)
    probe.sock.close(linger=0)
    return {"tally": tally, "samples": samples, "crashed": crashed, "final_stats": final,
            "seconds": time.monotonic() - start, "final_rss_kib": resident_kib(server.proc.pid)}


def report(args: argparse.Namespace, run: dict[str, Any], exit_code: int | None, log_tail: str) -> tuple[dict, str]:
    tally: Tally = run["tally"]
    rss = [s["rss_kib"] for s in run["samples"] if s["rss_kib"]]
    half = rss[len(rss) // 2:] or rss
    final = run["final_stats"] or {}
    leaked = final.get("kv_blocks_in_use")

    def pct(values: list[float], q: float) -> float | None:
        return round(percentile(values, q), 1) if values else None

    data = {
        "machine": machine_info(), "settings": vars(args), "seconds": round(run["seconds"], 1),
        "crashed": run["crashed"], "server_exit_code": exit_code, "problems": len(tally.problems),
        "problem_examples": tally.problems[:20], "leaked_kv_blocks": leaked, "final_stats": final,
        "actions": dict(tally.actions), "errors": dict(tally.errors),
        "ttft_ms": {"p50": pct(tally.ttft_ms, 50), "p99": pct(tally.ttft_ms, 99), "count": len(tally.ttft_ms)},
        "score_ms": {"p50": pct(tally.score_ms, 50), "p99": pct(tally.score_ms, 99), "count": len(tally.score_ms)},
        "rss_kib": {"first": rss[0] if rss else None, "peak": max(rss, default=None),
                    "last": rss[-1] if rss else None, "second_half_growth": half[-1] - half[0] if half else None},
        "samples": run["samples"], "server_log_tail": log_tail if (run["crashed"] or exit_code) else "",
    }
    r = data["rss_kib"]
    rows = [
        ["clients x duration", f"{args.clients} x {run['seconds'] / 60:.1f} min"],
        ["runtime crashed", "yes" if run["crashed"] else "no"],
        ["protocol problems / missing replies", len(tally.problems)],
        ["KV blocks in use after every client left", leaked if leaked is not None else "?"],
        ["runtime exit code on SIGTERM", exit_code],
        ["resident memory first / peak / last (MiB)",
         " / ".join(f"{v / 1024:.0f}" if v else "?" for v in (r["first"], r["peak"], r["last"]))],
        ["resident memory growth over the second half (MiB)",
         f"{r['second_half_growth'] / 1024:+.1f}" if r["second_half_growth"] is not None else "?"],
        ["time to first token p50 / p99 (ms)", f"{data['ttft_ms']['p50']} / {data['ttft_ms']['p99']} "
                                               f"({data['ttft_ms']['count']} streams)"],
        ["score latency p50 / p99 (ms)", f"{data['score_ms']['p50']} / {data['score_ms']['p99']}"],
        ["actions", ", ".join(f"{k} {v}" for k, v in sorted(tally.actions.items()))],
        ["error replies to well-formed requests", ", ".join(f"{k} {v}" for k, v in tally.errors.items()) or "none"],
    ]
    step = max(1, len(run["samples"]) // 12)
    memory = [[s["seconds"], f"{(s['rss_kib'] or 0) / 1024:.1f}", s["kv_blocks_in_use"], s["running"], s["waiting"]]
              for s in run["samples"][::step]]
    md = (f"# Soak: {args.clients} clients, {args.minutes:g} minutes\n\n{markdown_table(['', ''], rows)}\n\n"
          f"Over time:\n\n{markdown_table(['s', 'RSS MiB', 'KV blocks in use', 'running', 'waiting'], memory)}\n\n"
          f"Model: {args.model or 'tiny random Llama (2 layers, vocabulary 256)'}, --max-batch-size "
          f"{args.max_batch_size}. Machine: {data['machine']['cpu']}, {data['machine']['usable_cores']} usable "
          f"cores. Command: `python benchmarks/soak.py {' '.join(sys.argv[1:])}`\n")
    if tally.problems:
        md += "\nFirst problems:\n\n" + "\n".join(f"* {p}" for p in tally.problems[:10]) + "\n"
    return data, md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime_fixtures import build_tiny_llama, start_server

    workdir = Path(tempfile.mkdtemp(prefix="gllm-soak-"))
    model = args.model or build_tiny_llama(workdir / "tiny")
    server = start_server(model, workdir, "--log-level", "WARNING", "--max-batch-size", str(args.max_batch_size),
                          "--max-clients", str(max(256, 2 * args.clients + 8)))
    try:
        run = asyncio.run(soak(args, server))
    finally:
        exit_code = server.stop()
    data, md = report(args, run, exit_code, server.log()[-3000:])
    json_path, md_path = write_results(args.out, data, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    healthy = not run["crashed"] and not run["tally"].problems and exit_code == 0 and data["leaked_kv_blocks"] == 0
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
