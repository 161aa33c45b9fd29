"""Command line: ``gllm generate "prompt"`` and ``gllm serve`` (also ``python -m gllm ...``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    from gllm.loader.registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name, Hugging Face folder or .gguf file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-seq-len", type=int, default=2048)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gllm", description="gLLM: a local LLM runtime for games")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream one completion to the terminal")
    gen.add_argument("prompt")
    add_model_args(gen)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--logprobs", action="store_true", help="show each token's logprob")
    from gllm.runtime.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def generate(args: argparse.Namespace) -> int:
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    engine = LLMEngine(
        args.model,
        GeneratorParams(max_batch_size=1, max_seq_len=args.max_seq_len),
        device=args.device,
        dtype=DTYPES[args.dtype],
    )
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    req = GenerationRequest(
        **prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    engine.add_request(req)
    start, count, result = time.perf_counter(), 0, None
    while result is None:
        out = engine.step()
        for d in out.deltas:
            count += 1
            text = f"{d.text}\x1b[2m[{d.logprob:.2f}]\x1b[0m" if args.logprobs else d.text
            sys.stdout.write(text)
            sys.stdout.flush()
        result = out.finished[0] if out.finished else None
    elapsed = time.perf_counter() - start
    print(f"\n\n[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tok/s, finish: {result.finish_reason}]",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "serve":
            from gllm.runtime.cli import serve

            return serve(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gllm: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
