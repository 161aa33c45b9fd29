"""Stream a chat reply from a running ``gllm serve`` and print each token as it arrives.

    gllm serve &                                   # the default model on tcp://127.0.0.1:5555
    python examples/stream_client.py "Tell me about the blacksmith of our village."

Waits (``--wait`` seconds) for the runtime to come up, so it can be started right after ``gllm serve``.
Samples (temperature 0.7, top-p 0.9): small instruct models answer coherently that way, while greedy
decoding tends to repeat itself.
"""

from __future__ import annotations

import argparse
import sys
import time

from gllm.client import DEFAULT_ENDPOINT, Client, ServerError


def wait_for_runtime(client: Client, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping(timeout=1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no gllm runtime answered on {client.endpoint} within {seconds:g} s") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="Tell me about the blacksmith of our village in two sentences.")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    p.add_argument("--system", default="You are a friendly villager in a fantasy game. Answer briefly.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the runtime to answer")
    args = p.parse_args(argv)

    with Client(args.endpoint, timeout=120) as client:
        wait_for_runtime(client, args.wait)
        messages = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
        start = time.perf_counter()
        first = None
        try:
            stream = client.generate(messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed)
            for token in stream:
                first = first or time.perf_counter()
                sys.stdout.write(token.text)
                sys.stdout.flush()
        except ServerError as exc:
            print(f"\nthe runtime refused the request: {exc}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - start
        result = stream.result
        n = result.usage.completion_tokens
        ttft = (first - start) * 1000 if first else float("nan")
        print(f"\n\n[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, first token after {ttft:.0f} ms, "
              f"finish: {result.finish_reason}, prompt {result.usage.prompt_tokens} tokens "
              f"({result.usage.cached_tokens} cached)]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
