"""``gllm serve``: its arguments, and the process around the server (logging, signals, exit code)."""

from __future__ import annotations

import argparse
import gc
import logging
import re
import signal
import sys
from typing import TYPE_CHECKING

from gllm.runtime.limits import LIMIT_FLAGS
from gllm.runtime.protocol import DEFAULT_ENDPOINT

if TYPE_CHECKING:
    from gllm.runtime.access import CurveServer

# Limits set by an integer option named after them (the message size and open requests have their own).
COUNTED_LIMITS = {
    "max_clients": "clients connected at once before a new one gets 'overloaded'",
    "max_nesting_depth": "maps and arrays inside each other in a message",
    "max_prompt_tokens": "prompt tokens, after tokenization",
    "max_completion_tokens": "the largest max_tokens a generate may ask for",
    "max_stop_strings": "stop strings per generate",
    "max_stop_chars": "characters per stop string",
    "max_candidates": "candidates per score request",
    "max_candidate_tokens": "tokens per score candidate",
    "max_grammar_size": "symbols in a structured-output grammar (JSON Schema, grammar, regex, choices, tools)",
    "grammar_fuel": "work allowed to compile one such grammar (about 50 units per microsecond)",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"1.5GiB"`` or ``"2gb"`` (all powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1073741824)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def adapter_arg(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--adapter``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a PEFT folder or a GGUF LoRA file), got {text!r}")
    return name, path


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
    p.add_argument("--shutdown-drain", type=float, default=limits.shutdown_drain_s, metavar="SECONDS",
                   help="after the grace period, time clients get to read the replies still waiting for them; "
                        f"the process exits sooner once none wait (default {limits.shutdown_drain_s:g})")
    p.add_argument("--slow-client-timeout", type=float, default=limits.slow_client_timeout_s, metavar="SECONDS",
                   help="a client that takes none of its waiting replies for this long gets 'slow_client' and "
                        f"loses its open requests (default {limits.slow_client_timeout_s:g})")
    p.add_argument("--max-outbox-size", type=parse_size, default=limits.max_outbox_bytes, metavar="SIZE",
                   help="replies waiting for one slow client beyond this: 'slow_client', as above (default "
                        f"{limits.max_outbox_bytes >> 20}M)")
    p.add_argument("--max-state-size", type=parse_size, default=limits.max_state_bytes, metavar="SIZE",
                   help=f"largest saved state a snapshot returns or a restore sends (default {limits.max_state_bytes >> 20}M)")
    p.add_argument("--max-pinned-memory", type=parse_size, default=None, metavar="SIZE",
                   help="KV memory that restored states may keep pinned (default: half the KV cache)")
    for name, what in COUNTED_LIMITS.items():
        p.add_argument(LIMIT_FLAGS[name], type=positive_int, default=getattr(limits, name), metavar="N",
                       help=f"{what} (default {getattr(limits, name)})")
    access = p.add_argument_group("access", "tcp:// on an address other than loopback needs CurveZMQ or --insecure")
    access.add_argument("--curve-secret-key", metavar="FILE", help="the runtime's secret key (from gllm keygen): "
                        "encrypt every connection and let in only clients with an allowed key")
    access.add_argument("--allowed-keys", metavar="FILE_OR_DIR",
                        help="client public keys: a file of keys, one a line, or a folder of *.pub files")
    access.add_argument("--insecure", action="store_true",
                        help="serve a non-loopback address without CurveZMQ: anyone who reaches it can use it")
    p.add_argument("--adapter", type=adapter_arg, action="append", default=[], metavar="NAME=PATH",
                   help="load a LoRA adapter (PEFT folder or GGUF LoRA file) that requests can name; repeatable "
                        "(with --replicas, every replica loads it)")
    cluster = p.add_argument_group("cluster", "engine replicas on Ray Serve behind this endpoint (pip install "
                                   "gllm[cluster]); see docs/cluster.md")
    cluster.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                         help="run N engine replicas (one engine each) and relay every client to them")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="join this Ray cluster (e.g. 10.0.0.5:6379) instead of starting a local one")
    cluster.add_argument("--routing", default="affinity", choices=["affinity", "round-robin"],
                         help="affinity (default): a request's affinity key, else its longest cached prefix, else "
                              "the least loaded replica; round-robin: in turn")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def curve_settings(args: argparse.Namespace) -> CurveServer | None:
    """CurveZMQ settings from the options; ``ValueError`` when they are incomplete, or missing where needed."""
    import zmq

    from gllm.runtime.access import CurveServer, is_local
    from gllm.runtime.keys import read_allowed_keys, read_key

    if bool(args.curve_secret_key) != bool(args.allowed_keys):
        raise ValueError("--curve-secret-key and --allowed-keys go together: CurveZMQ needs the runtime's key "
                         "and the clients' public keys")
    if args.curve_secret_key:
        if not zmq.has("curve"):
            raise ValueError(f"this libzmq ({zmq.zmq_version()}) was built without CurveZMQ support")
        return CurveServer(read_key(args.curve_secret_key), read_allowed_keys(args.allowed_keys))
    if not is_local(args.bind) and not args.insecure:
        raise ValueError(f"refusing to serve {args.bind} without CurveZMQ: it is not a loopback address, so anyone "
                         "who reaches it could use the runtime. Make keys with 'gllm keygen' and pass "
                         "--curve-secret-key and --allowed-keys, or pass --insecure on a network you trust")
    return None


def serve(args: argparse.Namespace) -> int:
    import zmq

    from gllm.runtime.limits import ServerLimits

    curve = curve_settings(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gllm.serve")
    if args.insecure and not curve:
        log.warning("serving %s without CurveZMQ (--insecure): unencrypted, and open to anyone who reaches it",
                    args.bind)
    limits = ServerLimits(args.max_message_size, args.max_open_requests, args.shutdown_grace,
                          shutdown_drain_s=args.shutdown_drain, slow_client_timeout_s=args.slow_client_timeout,
                          max_outbox_bytes=args.max_outbox_size, max_state_bytes=args.max_state_size,
                          **{name: getattr(args, name) for name in COUNTED_LIMITS})
    if args.replicas is not None:
        from gllm.cluster.launch import serve_cluster  # imports Ray: only here

        return serve_cluster(args, limits, curve)
    if args.ray_address is not None:
        raise ValueError("--ray-address needs --replicas: one process serves without Ray")
    from gllm.cli import engine_options
    from gllm.constrain import GrammarLimits
    from gllm.engine import GeneratorParams, LLMEngine
    from gllm.runtime.server import Server

    params = GeneratorParams(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                             num_kv_blocks=args.kv_blocks, kv_memory=args.kv_memory,
                             max_pinned_memory=args.max_pinned_memory)
    try:
        engine = LLMEngine(args.model, params, **engine_options(args),
                           grammar_limits=GrammarLimits(args.max_grammar_size, args.grammar_fuel),
                           adapters=dict(args.adapter))
    except (ValueError, OSError):
        raise  # they name the file and what is wrong with it; gllm.cli.main prints them as one line
    except Exception as exc:  # anything else while loading (torch, memory): one line too, not a traceback
        log.debug("loading the model failed", exc_info=True)
        print(f"gllm: error: cannot load the model {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    engine.constraints.warm_up()  # structured output's tokenizer, built while the server starts
    try:
        server = Server(engine, args.bind, limits, curve=curve)
    except zmq.ZMQError as exc:
        log.error("cannot bind %s: %s", args.bind, exc)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    # The model, tokenizer and imported modules live as long as the process. Frozen out of the garbage
    # collector's view, they are no longer walked by every full collection: about 350,000 objects with
    # the default model, a 150 ms stall of every stream each time.
    gc.collect()
    gc.freeze()
    server.run()
    return 0
