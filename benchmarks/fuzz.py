"""The protocol fuzzer of the test suite, at length: 100,000 messages against a real ``gllm serve``.

The same fuzzer as ``tests/test_protocol_fuzz.py`` (``tests/protocol_fuzzer.py``): valid requests, broken
ones, random msgpack values, raw bytes and multi-frame messages from several connections at once, streams
cancelled and connections dropped at random. It fails at the first reply that breaks the protocol, a
missing reply (a hang), or a runtime that dies; at the end the runtime must hold no KV block and no open
request, and exit 0 on SIGTERM. The runtime serves a tiny random Llama (2 layers, vocabulary 256) unless
``--model`` names another.

    python benchmarks/fuzz.py                      # 100,000 messages; writes benchmarks/results/fuzz.{json,md}
    python benchmarks/fuzz.py --messages 5000 --out benchmarks/results/fuzz_quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `common` beside this file, run as a script
sys.path.insert(0, str(HERE.parent / "tests"))  # the fuzzer and the server helpers the tests use

from common import machine_info, markdown_table, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--connections", type=int, default=8, help="connections fuzzing at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model to serve (default: a tiny random Llama built here)")
    p.add_argument("--chunk", type=int, default=10_000, help="report progress every this many messages")
    p.add_argument("--out", default=str(HERE / "results" / "fuzz"))
    return p.parse_args(argv)


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from protocol_fuzzer import Fuzzer, FuzzReport
    from runtime_fixtures import build_tiny_llama, start_server

    workdir = Path(tempfile.mkdtemp(prefix="gllm-fuzz-"))
    model = args.model or build_tiny_llama(workdir / "tiny")
    server = start_server(model, workdir, "--log-level", "WARNING")
    total, chunks, failure = FuzzReport(), [], None
    fuzzer = Fuzzer(server.endpoint, seed=args.seed, connections=args.connections)
    start = time.monotonic()
    try:
        while total.messages < args.messages:
            report = fuzzer.run(min(args.chunk, args.messages - total.messages))
            total.messages += report.messages
            total.replies.update(report.replies)
            total.cancels += report.cancels
            total.disconnects += report.disconnects
            chunks.append({"messages": total.messages, "seconds": round(time.monotonic() - start, 1),
                           "server_rss_kib": resident_kib(server.proc.pid)})
            print(f"{total.messages} messages, {chunks[-1]['seconds']} s, "
                  f"server RSS {chunks[-1]['server_rss_kib']} KiB", flush=True)
            if server.proc.poll() is not None:
                raise AssertionError(f"gllm serve exited with {server.proc.returncode}")
        stats = fuzzer.settle()
    except AssertionError as exc:
        failure, stats = str(exc), None
    finally:
        fuzzer.close()
        exit_code = server.stop()
    total.seconds = time.monotonic() - start
    data = {"machine": machine_info(), "settings": vars(args), "messages": total.messages,
            "seconds": round(total.seconds, 1), "replies": dict(total.replies.most_common()),
            "cancels": total.cancels, "disconnects": total.disconnects, "progress": chunks,
            "final_stats": stats, "server_exit_code": exit_code, "failure": failure}
    rows = [["messages sent", total.messages], ["wall time", f"{total.seconds:.0f} s"],
            ["messages/s", f"{total.messages / total.seconds:.0f}"],
            ["cancels sent / connections dropped", f"{total.cancels} / {total.disconnects}"],
            ["failure", failure or "none: every reply valid, none missing"],
            ["KV blocks in use at the end", stats["kv_blocks_in_use"] if stats else "?"],
            ["server exit code (SIGTERM)", exit_code],
            ["server RSS first / last chunk", f"{chunks[0]['server_rss_kib']} / {chunks[-1]['server_rss_kib']} KiB"
             if chunks else "?"]]
    replies = [[kind, count] for kind, count in total.replies.most_common()]
    md = (f"# Protocol fuzzing: {total.messages} messages\n\n{markdown_table(['', ''], rows)}\n\n"
          f"Replies by type (errors by code):\n\n{markdown_table(['reply', 'count'], replies)}\n\n"
          f"Machine: {data['machine']['cpu']}, {data['machine']['usable_cores']} usable cores. "
          f"Command: `python benchmarks/fuzz.py {' '.join(sys.argv[1:])}`\n")
    json_path, md_path = write_results(args.out, data, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0 if failure is None and exit_code == 0 and stats and stats["kv_blocks_in_use"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
