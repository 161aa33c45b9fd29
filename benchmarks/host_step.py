"""Host work of one graphed, overlapped decode step: what the CPU does per step for B sequences on a GPU.

On a GPU the model runs in a captured graph, so the host's own work (scheduling, sampling bookkeeping,
outputs, staging the graph inputs) sets the pace of a large batch. This measures that work on the CPU:
the engine runs with overlap on and the graph path taken, but the model, the graph replay and the device
copies are stubbed (the logits are a fixed random tensor; sampling still runs, on the CPU). Best of 6
windows of 15 steps, 1 thread, tiny model, 1,000-token vocabulary.

    python benchmarks/host_step.py [--batches 1,16,64,256]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_results  # noqa: E402

from gllm.config import ModelConfig  # noqa: E402
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.graphs import DecodeGraphs  # noqa: E402
from gllm.loader import LoadedModel  # noqa: E402

VOCAB = 1000


class StubGraphs:
    """The host half of ``DecodeGraphs`` (its ``run`` stages the inputs) over CPU buffers, no real graph."""

    run = DecodeGraphs.run

    def __init__(self, batch: int, width: int = 32):
        self.sizes, self.scratch_slot = [batch], 0
        self.input_ids, self.positions, self.slots, self.seq_lens = (torch.zeros(batch, dtype=torch.int64) for _ in range(4))
        self.tables = torch.zeros(batch, width, dtype=torch.int64)
        self.outputs = {batch: torch.randn(batch, VOCAB)}
        self.graphs = {batch: types.SimpleNamespace(replay=lambda: None)}

    def fits(self, n: int) -> bool:
        return n <= self.sizes[0]


def host_ms_per_step(batch: int) -> float:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    weights = dict(transformers.LlamaForCausalLM(cfg).state_dict())
    loaded = LoadedModel("tiny", ModelConfig.from_hf_dict(cfg.to_dict()), weights, None)
    params = GeneratorParams(block_size=16, max_batch_size=batch, max_seq_len=300, max_num_batched_tokens=8192)
    engine = LLMEngine(loaded, params, dtype=torch.float32, overlap=True)
    engine.runner.graphs = StubGraphs(batch)
    for _ in range(batch):
        engine.add_request(GenerationRequest(prompt_token_ids=[1] * 128, max_new_tokens=160, temperature=0, ignore_eos=True))
    while not all(len(s.token_ids) > 129 for s in engine.scheduler.running):  # prompts done, decoding
        engine.step()
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        for _ in range(15):
            engine.step()
        best = min(best, (time.perf_counter() - start) / 15)
    return best * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "host_step"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, data = [], []
    for b in (int(x) for x in args.batches.split(",")):
        ms = host_ms_per_step(b)
        data.append({"batch": b, "host_ms_per_step": ms, "us_per_sequence": ms * 1000 / b})
        rows.append([b, f"{ms:.2f}", f"{ms * 1000 / b:.1f}"])
        print(data[-1], flush=True)
    info = machine_info()
    md = (f"# Host work per decode step (graphed, overlapped; model and device stubbed)\n\n{info['cpu']}, 1 thread, "
          f"torch {info['torch']}. Command: `python benchmarks/host_step.py --batches {args.batches}`\n\n"
          + markdown_table(["sequences", "host ms per step", "µs per sequence"], rows))
    write_results(args.out, {"machine": info, "results": data}, md)
    print(md)


if __name__ == "__main__":
    main()
