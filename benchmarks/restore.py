"""Saved conversations: restoring a 2,000-token chat's KV vs computing it again, CPU.

For each model: a 2,000-token chat (turns of public-domain text in the default model's chat template) is
computed once and saved with ``LLMEngine.snapshot``. Then, with the prefix cache emptied each time:

* recompute: the time to the first token of the chat plus a new 8-token line (the whole prompt computed);
* restore: ``LLMEngine.restore`` of the saved state (parse, checksum, copy into the cache), then the time
  to the first token of the same request (only its tail computed).

The goal is a restore at least 10x faster than the recompute. The state's size per token is reported
with it. Models: the default (SmolLM2-135M-Instruct), or those given with ``--model NAME_OR_PATH`` (e.g.
a 1.7B-shaped GGUF); all take the default model's token ids (same vocabulary).

    python benchmarks/restore.py [--model NAME_OR_PATH ...] [--dtype auto|float32|bfloat16] [--repeats 3]
                                 [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Stopwatch, machine_info, markdown_table, summarize, write_results  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.loader.registry import DEFAULT_MODEL  # noqa: E402

CHAT_TOKENS = 2000
LINE = 8  # tokens of the new line after the saved chat
TEXT = Path(__file__).resolve().parent / "data" / "public_domain.txt"


def chat_tokens(engine: LLMEngine) -> list[int]:
    """Exactly ``CHAT_TOKENS`` tokens of a chat: paragraphs of the public-domain text as alternating turns."""
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    turns = [{"role": "system", "content": "You are Mira, the blacksmith of Oakvale."}]
    ids: list[int] = []
    while len(ids) < CHAT_TOKENS:
        turns.append({"role": ("user", "assistant")[len(turns) % 2], "content": paragraphs[len(turns) % len(paragraphs)]})
        ids = engine.tokenizer.apply_chat_template(turns)
    return ids[:CHAT_TOKENS]


def first_token_ms(engine: LLMEngine, ids: list[int]) -> tuple[float, int]:
    r = engine.generate([GenerationRequest(prompt_token_ids=ids, max_new_tokens=1, temperature=0)])[0]
    return r.metrics["ttft_ms"], r.num_cached_tokens


def measure(model: str, chat: list[int], repeats: int, dtype: str) -> dict:
    engine = LLMEngine(model, GeneratorParams(max_batch_size=1, max_seq_len=CHAT_TOKENS + 256,
                                              max_num_batched_tokens=CHAT_TOKENS + 256), dtype=dtype)
    follow_up = chat + chat[100 : 100 + LINE]
    first_token_ms(engine, chat[:64])  # warm-up: kernels, allocator
    pool = engine.block_manager.pool
    recompute, restore, restored_first, cached = [], [], [], []
    state = b""
    for _ in range(repeats):
        pool.clear_cache()
        ms, hit = first_token_ms(engine, follow_up)
        assert hit == 0
        recompute.append(ms)
        with Stopwatch() as save:
            state = engine.snapshot(prompt_token_ids=chat)
        pool.clear_cache()
        with Stopwatch() as sw:
            restored = engine.restore(state)
        assert restored == CHAT_TOKENS // engine.params.block_size * engine.params.block_size
        restore.append(sw.seconds * 1000)
        ms, hit = first_token_ms(engine, follow_up)
        restored_first.append(ms)
        cached.append(hit)
    total = [a + b for a, b in zip(restore, restored_first)]
    return {
        "model": engine.model_name, "dtype": str(engine.dtype).replace("torch.", ""), "layers": engine.config.num_layers,
        "kv_heads": engine.config.num_kv_heads, "head_dim": engine.config.head_dim, "chat_tokens": CHAT_TOKENS,
        "state_bytes": len(state), "state_bytes_per_token": len(state) / restored, "snapshot_from_cache_ms": save.seconds * 1000,
        "recompute_first_token_ms": summarize(recompute), "restore_ms": summarize(restore),
        "first_token_after_restore_ms": summarize(restored_first), "restore_plus_first_token_ms": summarize(total),
        "cached_tokens_after_restore": cached, "speedup_median": summarize(recompute)["median"] / summarize(total)["median"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a model to measure (default: the default model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "restore"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer_engine = LLMEngine(DEFAULT_MODEL, GeneratorParams(max_batch_size=1, max_seq_len=CHAT_TOKENS + 256))
    chat = chat_tokens(tokenizer_engine)
    del tokenizer_engine
    rows = [measure(model, chat, args.repeats, args.dtype) for model in args.model or [DEFAULT_MODEL]]
    table = markdown_table(
        ["model", "dtype", "recompute: first token (ms)", "restore (ms)", "then first token (ms)", "speedup",
         "state (MB)", "bytes / token"],
        [[r["model"], r["dtype"], f"{r['recompute_first_token_ms']['median']:.0f}", f"{r['restore_ms']['median']:.0f}",
          f"{r['first_token_after_restore_ms']['median']:.0f}", f"{r['speedup_median']:.1f}x",
          f"{r['state_bytes'] / 1e6:.1f}", f"{r['state_bytes_per_token']:,.0f}"] for r in rows])
    machine = machine_info()
    text = (f"# Restore vs recompute, {CHAT_TOKENS}-token chat\n\n{machine['cpu']}, {args.threads} threads, "
            f"medians of {args.repeats}; `python benchmarks/restore.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
    write_results(args.out, {"machine": machine, "threads": args.threads, "repeats": args.repeats, "rows": rows}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
