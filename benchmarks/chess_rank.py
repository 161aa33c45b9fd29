"""Milliseconds to rank every legal move of a middlegame position with one ``score`` request.

The chess bot example (``examples/chess_bot``) makes one ``score`` request per move: the prompt is the
game so far in PGN move text, the candidates are all legal moves in SAN. Goal: under 300 ms on the CPU.

Positions: plies ``--first-ply`` .. ``--first-ply + --plies - 1`` of every game in the example's
``games.pgn`` long enough to have them (famous 19th-century games; 25 to 45 legal moves per position).
Two cases, as they happen in play:

* **first sight**: the first position of each game, whose movetext the runtime has never seen (only the
  PGN header lines are in the prefix cache);
* **in a game**: each following position of the same game, one move later. Its prompt extends the one
  before, so the runtime's prefix cache serves all of it but the last partial 16-token block, as it does
  while the bot plays.

Time is measured at the client around ``Client.score`` (request sent to scores received), and also read
from the runtime's own ``timing.total_ms``. The runtime runs in its own process (``gllm serve``).

    python benchmarks/chess_rank.py             # writes benchmarks/results/chess_rank.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHESS = HERE.parent / "examples" / "chess_bot"
sys.path.insert(0, str(HERE))  # `common` beside this file, run as a script
sys.path.insert(0, str(CHESS))

from common import machine_info, markdown_table, resolved_dtype, write_results  # noqa: E402

GOAL_MS = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first-ply", type=int, default=24, help="first middlegame ply taken from each game")
    p.add_argument("--plies", type=int, default=8, help="consecutive positions per game")
    p.add_argument("--endpoint", default=None, help="use this running runtime instead of starting one")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="for the runtime this script starts (auto: bfloat16 where the CPU has fast kernels)")
    p.add_argument("--out", default=str(HERE / "results" / "chess_rank"))
    return p.parse_args(argv)


def positions(first_ply: int, plies: int) -> list[list[Any]]:
    """Per game, the boards at the chosen plies (games too short are skipped)."""
    import chess.pgn

    games = []
    with open(CHESS / "games.pgn", encoding="utf-8") as f:
        while (game := chess.pgn.read_game(f)) is not None:
            moves = list(game.mainline_moves())
            if len(moves) < first_ply + plies:
                continue
            board, boards = game.board(), []
            for ply, move in enumerate(moves[: first_ply + plies]):
                if ply >= first_ply:
                    boards.append(board.copy())
                board.push(move)
            games.append(boards)
    return games


def measure(endpoint: str, games: list[list[Any]]) -> list[dict[str, Any]]:
    from bot import ChessBot
    from gllm.client import Client

    rows = []
    with Client(endpoint, timeout=300) as client:
        bot = ChessBot(client)
        bot.rank(games[0][0].root())  # warm-up: the header lines go into the prefix cache
        for g, boards in enumerate(games):
            for i, board in enumerate(boards):
                start = time.perf_counter()
                choice = bot.rank(board)
                ms = (time.perf_counter() - start) * 1000
                rows.append({"game": g, "ply": board.ply(), "case": "first sight" if i == 0 else "in a game",
                             "legal_moves": len(choice.candidates), "client_ms": ms,
                             "server_ms": choice.server_ms, "prompt_tokens": choice.prompt_tokens,
                             "cached_tokens": choice.cached_tokens,
                             "candidate_tokens": sum(r.num_tokens for r in choice.ranking)})
                print(f"game {g} ply {board.ply()}: {len(choice.candidates)} moves in {ms:.0f} ms "
                      f"(runtime {choice.server_ms:.0f} ms, {choice.cached_tokens}/{choice.prompt_tokens} "
                      "prompt tokens cached)", flush=True)
    return rows


def summary(rows: list[dict[str, Any]], case: str) -> dict[str, Any]:
    sel = [r for r in rows if r["case"] == case]
    client = sorted(r["client_ms"] for r in sel)
    return {
        "case": case, "positions": len(sel),
        "legal_moves_mean": statistics.fmean(r["legal_moves"] for r in sel),
        "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in sel),
        "cached_tokens_mean": statistics.fmean(r["cached_tokens"] for r in sel),
        "client_ms_median": statistics.median(client), "client_ms_best": client[0], "client_ms_worst": client[-1],
        "server_ms_median": statistics.median(r["server_ms"] for r in sel),
        "under_goal": sum(ms < GOAL_MS for ms in client) / len(client),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    games = positions(args.first_ply, args.plies)
    load_before = os.getloadavg()
    if args.endpoint:
        rows = measure(args.endpoint, games)
    else:
        from gllm.client import LocalRuntime

        with LocalRuntime(extra_args=("--dtype", args.dtype)) as runtime:
            rows = measure(runtime.endpoint, games)
    load_after = os.getloadavg()
    table = [summary(rows, case) for case in ("first sight", "in a game")]
    machine = machine_info(("torch", "chess"))
    markdown = "\n".join([
        "# Chess: time to rank all legal moves of a middlegame position",
        "",
        f"smollm2-135m-instruct, {resolved_dtype(args.dtype)}, CPU ({machine['cpu']}, {machine['usable_cores']} usable cores); "
        f"gllm serve in its own process, Client in this one. Plies {args.first_ply}..{args.first_ply + args.plies - 1}"
        f" of the {len(games)} games of examples/chess_bot/games.pgn that are that long. Load average before / "
        f"after: {[round(x, 2) for x in load_before]} / {[round(x, 2) for x in load_after]} (the machine was "
        "shared with other work: expect noise).",
        "",
        markdown_table(["case", "positions", "legal moves (mean)", "prompt tokens, cached (mean)",
                        "ms median (client)", "best", "worst", "ms median (runtime)", f"under {GOAL_MS} ms"],
                       [[t["case"], t["positions"], f"{t['legal_moves_mean']:.0f}",
                         f"{t['prompt_tokens_mean']:.0f}, {t['cached_tokens_mean']:.0f}",
                         f"{t['client_ms_median']:.0f}", f"{t['client_ms_best']:.0f}", f"{t['client_ms_worst']:.0f}",
                         f"{t['server_ms_median']:.0f}", f"{100 * t['under_goal']:.0f}%"] for t in table]),
        "",
        f"Goal: under {GOAL_MS} ms per position on the CPU.",
    ])
    data = {"machine": machine, "settings": vars(args), "load_before": load_before, "load_after": load_after,
            "summary": table, "positions": rows}
    json_path, md_path = write_results(args.out, data, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
