"""Training data for a chess adapter: positions from random games, each with Stockfish's preferred move.

Each line of the output is one example in the chess bot's own prompt format (``examples/chess_bot``):
``{"prompt": "<PGN headers and move text>", "completion": " Nf3"}``. Positions come from games whose
moves are drawn from Stockfish's top moves with some randomness (so they look like play, not noise),
and the target is Stockfish's best move at ``--depth``. Everything is made locally: python-chess and
Debian's ``stockfish``.

    python examples/lora/make_data.py --positions 2000 --out examples/lora/data/chess.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import chess
import chess.engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chess_bot"))
from bot import prompt_for  # noqa: E402


def positions(engine: chess.engine.SimpleEngine, count: int, depth: int, rng: random.Random):
    """Yield (board, best move) from games played by a noisy Stockfish until ``count`` are made."""
    made = 0
    while made < count:
        board = chess.Board()
        while not board.is_game_over() and board.fullmove_number < 60 and made < count:
            infos = engine.analyse(board, chess.engine.Limit(depth=depth), multipv=3)
            best = infos[0]["pv"][0]
            if board.fullmove_number > 1 or board.turn == chess.BLACK:  # skip the empty-board prompt
                yield board.copy(), best
                made += 1
            # the game goes on with one of the top moves, sometimes a random one, for varied positions
            choices = [info["pv"][0] for info in infos if "pv" in info]
            board.push(rng.choice(list(board.legal_moves)) if rng.random() < 0.15 else rng.choice(choices))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=2000)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stockfish", default="/usr/games/stockfish")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "chess.jsonl")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    engine = chess.engine.SimpleEngine.popen_uci(args.stockfish, timeout=300)  # a busy machine starts it slowly
    try:
        engine.configure({"Threads": 1, "Hash": 64})
        with args.out.open("w") as f:
            for i, (board, move) in enumerate(positions(engine, args.positions, args.depth, random.Random(args.seed))):
                f.write(json.dumps({"prompt": prompt_for(board), "completion": " " + board.san(move)}) + "\n")
                if (i + 1) % 100 == 0:
                    print(f"{i + 1} positions", file=sys.stderr, flush=True)
    finally:
        engine.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
