"""``gllm serve``: its arguments, and the process around the server (logging, signals, exit code)."""

from __future__ import annotations

import argparse
import logging
import re
import signal

from gllm.runtime.protocol import DEFAULT_ENDPOINT

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"1.5GiB"`` or ``"2gb"`` (all powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1073741824)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from gllm.cli import add_model_args
    from gllm.runtime.limits import ServerLimits

    limits = ServerLimits()
    p = sub.add_parser("serve", help="serve the model to game clients over ZeroMQ (protocol v1)")
    add_model_args(p)
    p.add_argument("--bind", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"ZeroMQ endpoint, tcp://HOST:PORT or ipc://PATH (default {DEFAULT_ENDPOINT})")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests running at once (default 8)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-blocks", type=int, default=None, help="KV cache size in blocks")
    kv.add_argument("--kv-memory", type=parse_size, default=None, metavar="SIZE",
                    help="KV cache size in bytes, e.g. 512M or 2G")
    p.add_argument("--max-open-requests", type=int, default=limits.max_open_requests,
                   help=f"open requests per client before 'overloaded' (default {limits.max_open_requests})")
    p.add_argument("--max-message-size", type=parse_size, default=limits.max_message_bytes, metavar="SIZE",
                   help=f"largest accepted message (default {limits.max_message_bytes // 1024}K)")
    p.add_argument("--shutdown-grace", type=float, default=limits.shutdown_grace_s, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, time in-flight requests get to finish (default "
                        f"{limits.shutdown_grace_s:g})")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def serve(args: argparse.Namespace) -> int:
    import zmq

    from gllm.cli import DTYPES
    from gllm.engine import GeneratorParams, LLMEngine
    from gllm.runtime.limits import ServerLimits
    from gllm.runtime.server import Server

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gllm.serve")
    params = GeneratorParams(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                             num_kv_blocks=args.kv_blocks, kv_memory=args.kv_memory)
    engine = LLMEngine(args.model, params, device=args.device, dtype=DTYPES[args.dtype])
    limits = ServerLimits(args.max_message_size, args.max_open_requests, args.shutdown_grace)
    try:
        server = Server(engine, args.bind, limits)
    except zmq.ZMQError as exc:
        log.error("cannot bind %s: %s", args.bind, exc)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.run()
    return 0
