"""How good is the bot's ranking? Average centipawn loss on positions from real games, judged by Stockfish.

    python examples/chess_bot/evaluate.py --serve                 # start a runtime, evaluate, stop it
    python examples/chess_bot/evaluate.py --endpoint tcp://127.0.0.1:5555 --every 3 --depth 12

For each position taken from the committed games (``games.pgn``, famous 19th-century games), Stockfish
analyses every legal move at a fixed depth (one MultiPV search covering all root moves). A move's
*centipawn loss* is how much worse Stockfish finds it than its best move, from the mover's point of view,
capped at ``--cap`` centipawns (1000 by default) so that a single missed mate, scored as +/-100000, does
not swamp the average. Compared, on the same positions:

* the bot: the top-ranked move of one ``score`` request (greedy, as ``play.py`` plays by default);
* the bot with length-normalised scores (mean logprob per token instead of the sum), for information;
* a uniformly random legal move: its *expected* loss, the mean over all legal moves (no sampling noise);
* the move actually played in the game, by a 19th-century master;
* with ``--adapter``, the bot again under that LoRA adapter (the same positions, the same Stockfish
  analysis), and the paired difference bot - bot with the adapter.

The headline is the paired difference random - bot over positions, with its standard error: the bot is
better than chance only if that difference is clearly above zero. Results go to ``results/evaluate.json``
and ``results/evaluate.md`` next to this file, whatever they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import chess
import chess.engine
import chess.pgn

from bot import ChessBot
from gllm.client import DEFAULT_ENDPOINT, Client
from gllm.client import LocalRuntime

HERE = Path(__file__).resolve().parent
MATE = 100_000
BLUNDER_CP = 300


@dataclass
class Position:
    game: str
    ply: int
    fen: str
    num_legal: int
    bot_move: str  # SAN
    bot_norm_move: str  # SAN, by mean logprob per token
    game_move: str  # SAN
    best_move: str  # Stockfish's, SAN
    bot_loss: float
    bot_norm_loss: float
    random_loss: float  # expected over a uniform choice
    game_loss: float
    score_ms: float
    adapter_move: str | None = None  # SAN, top move under the adapter (with --adapter)
    adapter_loss: float | None = None


def positions_from(pgn_path: Path, every: int, first_ply: int) -> list[tuple[str, int, chess.Board, chess.Move]]:
    """(game label, ply, board before the move, move played) for every ``every``-th ply from ``first_ply``."""
    out = []
    with open(pgn_path, encoding="utf-8") as f:
        while (game := chess.pgn.read_game(f)) is not None:
            label = f'{game.headers["White"]} - {game.headers["Black"]}, {game.headers["Date"][:4]}'
            board = game.board()
            for ply, move in enumerate(game.mainline_moves()):
                if ply >= first_ply and (ply - first_ply) % every == 0:
                    out.append((label, ply, board.copy(stack=True), move))
                board.push(move)
    return out


def losses(engine: chess.engine.SimpleEngine, board: chess.Board, depth: int, cap: float) -> dict[chess.Move, float]:
    """Centipawn loss of every legal move, from one MultiPV search over all of them."""
    infos = engine.analyse(board, chess.engine.Limit(depth=depth), multipv=board.legal_moves.count())
    scores = {info["pv"][0]: info["score"].pov(board.turn).score(mate_score=MATE) for info in infos}
    missing = [m for m in board.legal_moves if m not in scores]
    if missing:  # Stockfish reports every root move under MultiPV >= their number; be loud if not
        raise RuntimeError(f"Stockfish left out {missing} in {board.fen()}")
    best = max(scores.values())
    return {move: min(cap, best - cp) for move, cp in scores.items()}


def evaluate(client: Client, engine: chess.engine.SimpleEngine, samples, depth: int, cap: float,
             adapter: str | None = None) -> list[Position]:
    bot = ChessBot(client)
    tuned = ChessBot(client, adapter=adapter) if adapter else None
    rows = []
    for i, (label, ply, board, game_move) in enumerate(samples):
        start = time.perf_counter()
        choice = bot.rank(board)
        score_ms = (time.perf_counter() - start) * 1000
        norm = max(choice.ranking, key=lambda r: r.logprob / r.num_tokens)
        tuned_move = tuned.rank(board).move if tuned else None
        loss = losses(engine, board, depth, cap)
        best = min(loss, key=loss.get)
        rows.append(Position(
            game=label, ply=ply, fen=board.fen(), num_legal=len(loss),
            bot_move=choice.move.san, bot_norm_move=norm.san, game_move=board.san(game_move),
            best_move=board.san(best), bot_loss=loss[choice.move.move], bot_norm_loss=loss[norm.move],
            random_loss=statistics.fmean(loss.values()), game_loss=loss[game_move], score_ms=score_ms,
            adapter_move=tuned_move.san if tuned_move else None,
            adapter_loss=loss[tuned_move.move] if tuned_move else None,
        ))
        r = rows[-1]
        with_adapter = f", adapter {r.adapter_move} ({r.adapter_loss:.0f})" if tuned else ""
        print(f"[{i + 1}/{len(samples)}] {label} ply {ply}: bot {r.bot_move} ({r.bot_loss:.0f} cp), "
              f"game {r.game_move} ({r.game_loss:.0f}){with_adapter}, random {r.random_loss:.0f}, best {r.best_move}, "
              f"{r.num_legal} moves ranked in {score_ms:.0f} ms", file=sys.stderr, flush=True)
    return rows


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows: list[Position]) -> dict[str, dict[str, float]]:
    def column(get) -> dict[str, float]:
        values = [get(r) for r in rows]
        mean, se = mean_se(values)
        return {"mean_cpl": mean, "se": se, "median_cpl": statistics.median(values),
                "blunders": sum(v >= BLUNDER_CP for v in values) / len(values),
                "best_move": sum(v == 0 for v in values) / len(values)}

    table = {
        "bot (sum of logprobs, greedy)": column(lambda r: r.bot_loss),
        "bot (mean logprob per token)": column(lambda r: r.bot_norm_loss),
        "uniformly random legal move (expected)": column(lambda r: r.random_loss),
        "move played in the game": column(lambda r: r.game_loss),
    }
    tuned = rows and rows[0].adapter_loss is not None
    if tuned:
        table["bot under the adapter (sum of logprobs, greedy)"] = column(lambda r: r.adapter_loss)
    # A random mover's "blunder rate" and "best move" share are expectations too, not 0/1 per position;
    # they are left out rather than shown wrong.
    table["uniformly random legal move (expected)"].update(blunders=math.nan, best_move=math.nan)
    diff, diff_se = mean_se([r.random_loss - r.bot_loss for r in rows])
    table["random - bot (paired)"] = {"mean_cpl": diff, "se": diff_se}
    if tuned:
        diff, diff_se = mean_se([r.bot_loss - r.adapter_loss for r in rows])
        table["bot - bot under the adapter (paired)"] = {"mean_cpl": diff, "se": diff_se}
    return table


def write_results(rows: list[Position], table: dict, settings: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "summary": table, "positions": [asdict(r) for r in rows]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# Chess bot: centipawn loss on positions from real games",
        "",
        f"{settings['positions']} positions (one ply in {settings['every']}, from ply {settings['first_ply']}) of "
        f"{settings['games']} games in `games.pgn`; model `{settings['model']}`; judged by {settings['stockfish']} "
        f"at depth {settings['depth']} (MultiPV over all legal moves, 1 thread); losses capped at "
        f"{settings['cap']:g} cp; blunder = loss >= {BLUNDER_CP} cp. Ranking time per position: median "
        f"{settings['score_ms_median']:.0f} ms ({settings['machine']}, shared with other work).",
        "",
        "| mover | mean CPL (± s.e.) | median CPL | blunders | Stockfish's best move |",
        "|---|---|---|---|---|",
    ]
    pct = lambda v: "-" if math.isnan(v) else f"{100 * v:.0f}%"  # noqa: E731
    for name, c in table.items():
        if "median_cpl" in c:
            lines.append(f"| {name} | {c['mean_cpl']:.0f} (± {c['se']:.0f}) | {c['median_cpl']:.0f} | "
                         f"{pct(c['blunders'])} | {pct(c['best_move'])} |")
    d = table["random - bot (paired)"]
    lines += ["", f"Paired difference, random - bot: {d['mean_cpl']:.0f} cp (± {d['se']:.0f} s.e.); "
              "positive means the bot loses less than a random mover."]
    if (d := table.get("bot - bot under the adapter (paired)")) is not None:
        lines += ["", f"Paired difference, bot - bot under the adapter `{settings['adapter']}`: {d['mean_cpl']:.0f} cp "
                  f"(± {d['se']:.0f} s.e.); positive means the adapter makes the bot lose less."]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="a running gllm serve")
    p.add_argument("--serve", action="store_true", help="start a private runtime and stop it at the end")
    p.add_argument("--model", default=None, help="model for --serve")
    p.add_argument("--pgn", type=Path, default=HERE / "games.pgn")
    p.add_argument("--every", type=int, default=3, help="take every n-th ply of each game")
    p.add_argument("--first-ply", type=int, default=0)
    p.add_argument("--depth", type=int, default=12, help="Stockfish search depth")
    p.add_argument("--cap", type=float, default=1000.0, help="largest loss counted for one move, centipawns")
    p.add_argument("--stockfish", default="/usr/games/stockfish")
    p.add_argument("--out", type=Path, default=HERE / "results" / "evaluate")
    p.add_argument("--adapter", default=None, metavar="NAME[=PATH]",
                   help="also rank every position under a LoRA adapter: its name in the runtime; "
                        "with --serve, NAME=PATH loads it")
    args = p.parse_args(argv)

    if args.serve:
        extra = ("--adapter", args.adapter) if args.adapter and "=" in args.adapter else ()
        with LocalRuntime(args.model, extra_args=extra) as runtime:
            return run(args, runtime.endpoint)
    return run(args, args.endpoint)


def run(args: argparse.Namespace, endpoint: str) -> int:
    samples = positions_from(args.pgn, args.every, args.first_ply)
    engine = chess.engine.SimpleEngine.popen_uci(args.stockfish)
    try:
        engine.configure({"Threads": 1, "Hash": 64})
        with Client(endpoint, timeout=300) as client:
            model = client.info().model
            adapter = args.adapter.partition("=")[0] if args.adapter else None
            rows = evaluate(client, engine, samples, args.depth, args.cap, adapter)
        stockfish = engine.id.get("name", "Stockfish")
    finally:
        engine.quit()
    table = summarize(rows)
    settings = {
        "model": model, "adapter": args.adapter, "stockfish": stockfish, "depth": args.depth, "cap": args.cap, "every": args.every,
        "first_ply": args.first_ply, "positions": len(rows), "games": len({r.game for r in rows}),
        "score_ms_median": statistics.median(r.score_ms for r in rows),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
    }
    write_results(rows, table, settings, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
