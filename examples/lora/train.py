"""Train a LoRA adapter on the CPU with peft and transformers, for the default model (or any HF model).

The loss is the completion's tokens only (the move after the prompt), the same quantity the chess bot
ranks moves by, so training raises the log-probability of Stockfish's move among the legal ones. The
adapter is saved in the PEFT format that ``gllm serve --adapter chess=DIR`` loads.

    python examples/lora/train.py --data examples/lora/data/chess.jsonl --out examples/lora/adapters/chess \
        --minutes 120 --rank 16

Training stops after ``--epochs`` passes or ``--minutes`` of wall time, whichever comes first, and saves
the adapter (also every ``--save-every`` steps, so a long run can be stopped at any time).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import peft
import torch
import transformers

from gllm.loader.registry import DEFAULT_MODEL, resolve


def load_base(model: str) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A registered name (its GGUF file, dequantized by transformers) or a HF folder, in float32."""
    kwargs = {}
    if model == DEFAULT_MODEL:
        path = resolve(model)
        model, kwargs = str(path.parent), {"gguf_file": path.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model, **kwargs)
    net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs)
    return net, tokenizer


def batches(examples: list[dict], tokenizer, batch_size: int, rng: random.Random):
    """Padded batches whose labels are -100 everywhere but on the completion's tokens."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = []
        for i in order[start : start + batch_size]:
            prompt = tokenizer.encode(examples[i]["prompt"])
            completion = tokenizer.encode(examples[i]["completion"], add_special_tokens=False)
            rows.append((prompt + completion, [-100] * len(prompt) + completion))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        yield (torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
               torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
               torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]))  # fmt: skip


def completion_loss(net: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the completion's tokens, with the output head run only where they are predicted
    (a few positions a row, not all of a long prompt's: a vocabulary of 49,152 makes those logits the
    largest tensors of a step)."""
    hidden = net.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    logits = net.get_output_embeddings()(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][rows, cols])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=Path(__file__).parent / "data" / "chess.jsonl")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "adapters" / "chess")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="run the products in bfloat16 (torch.autocast; fast on CPUs with AMX or AVX512-BF16)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    examples = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    base, tokenizer = load_base(args.model)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    model = peft.get_peft_model(base, config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    started = time.monotonic()
    rng, deadline, step = random.Random(args.seed), started + 60 * args.minutes, 0
    model.train()
    for epoch in range(args.epochs):
        for ids, mask, labels in batches(examples, tokenizer, args.batch_size, rng):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = completion_loss(model.get_base_model(), ids, mask, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            print(f"epoch {epoch} step {step} loss {loss.item():.4f} at {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)
            if step % args.save_every == 0:
                model.save_pretrained(args.out)
            if time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            break
    model.save_pretrained(args.out)
    print(f"saved {args.out} after {step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
