"""Command line: ``gllm generate "prompt"``, ``gllm serve`` and ``gllm keygen`` (also ``python -m gllm ...``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    from gllm.loader.registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name, Hugging Face folder or .gguf file")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="auto (default): bfloat16 on a GPU or a CPU with bfloat16 kernels, else float32")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: weight-only int8 for faster single-stream decoding (CPU, bfloat16)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model (default: one per core); leave some to the game")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-seq-len", type=int, default=2048)


def engine_options(args: argparse.Namespace) -> dict:
    """``LLMEngine`` keyword arguments from the model flags; applies ``--threads`` to this process."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    return {"device": args.device, "dtype": args.dtype, "quantize": args.quantize}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gllm", description="gLLM: a local LLM runtime for games")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream one completion to the terminal")
    gen.add_argument("prompt")
    add_model_args(gen)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--thinking", action="store_true",
                     help="with --chat: let a thinking model (Qwen3, SmolLM3) reason before it answers")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--logprobs", action="store_true", help="show each token's logprob")
    from gllm.runtime.cli import add_serve_parser
    from gllm.runtime.keys import add_keygen_parser

    add_serve_parser(sub)
    add_keygen_parser(sub)
    return parser


def generate(args: argparse.Namespace) -> int:
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    engine = LLMEngine(
        args.model,
        GeneratorParams(max_batch_size=1, max_seq_len=args.max_seq_len),
        **engine_options(args),
    )
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    req = GenerationRequest(
        **prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        thinking=args.thinking,
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
        if args.command == "keygen":
            from gllm.runtime.keys import keygen

            return keygen(args)
    except (ValueError, OSError) as exc:
        print(f"gllm: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
