"""Play whole games with the gLLM chess bot, against a random mover or against itself, and print the PGN.

    gllm serve &                                              # or pass --serve to start a private one
    python examples/chess_bot/play.py                         # the bot (White) vs a random mover
    python examples/chess_bot/play.py --opponent self --temperature 0.5 --games 2
    python examples/chess_bot/play.py --serve --max-plies 40  # start and stop its own runtime

Each of the bot's moves carries a PGN comment with its logprob (log P of the move text given the game so
far), its probability among the legal moves, and its rank. A game ends the way the rules end it
(checkmate, stalemate, insufficient material, the fifty-move rule or threefold repetition, draws being
claimed as soon as they can be, see ``chess.Board.outcome(claim_draw=True)``), or at ``--max-plies``, in
which case its result is ``*`` (unfinished), as PGN writes it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import chess
import chess.pgn

from bot import ChessBot, Choice
from gllm.client import DEFAULT_ENDPOINT, Client
from gllm.client import LocalRuntime

TERMINATIONS = {
    chess.Termination.CHECKMATE: "checkmate",
    chess.Termination.STALEMATE: "stalemate",
    chess.Termination.INSUFFICIENT_MATERIAL: "insufficient material",
    chess.Termination.SEVENTYFIVE_MOVES: "seventy-five-move rule",
    chess.Termination.FIVEFOLD_REPETITION: "fivefold repetition",
    chess.Termination.FIFTY_MOVES: "fifty-move rule (claimed)",
    chess.Termination.THREEFOLD_REPETITION: "threefold repetition (claimed)",
}


class Player(Protocol):
    name: str

    def choose(self, board: chess.Board) -> chess.Move | Choice: ...


class RandomMover:
    """Plays a uniformly random legal move: the baseline the bot has to beat."""

    name = "random mover"

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    def choose(self, board: chess.Board) -> chess.Move:
        return self.rng.choice(list(board.legal_moves))


class BotPlayer:
    """The ``ChessBot`` as a player with a name for the PGN headers."""

    def __init__(self, bot: ChessBot, name: str):
        self.bot = bot
        self.name = name

    def choose(self, board: chess.Board) -> Choice:
        return self.bot.choose(board)


@dataclass
class GameRecord:
    board: chess.Board  # the final position, with the whole move stack
    choices: list[Choice | None] = field(default_factory=list)  # per ply; None for the random mover's
    result: str = "*"
    ending: str = "move cap reached"
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.result != "*"


def play_game(white: Player, black: Player, max_plies: int | None = None, fen: str | None = None) -> GameRecord:
    """Play until the rules end the game (draws claimed at once) or ``max_plies`` moves have been made."""
    board = chess.Board(fen) if fen else chess.Board()
    record = GameRecord(board)
    start = time.perf_counter()
    while (outcome := board.outcome(claim_draw=True)) is None:
        if max_plies is not None and len(board.move_stack) >= max_plies:
            break
        player = white if board.turn == chess.WHITE else black
        picked = player.choose(board)
        choice = picked if isinstance(picked, Choice) else None
        move = choice.move.move if choice else picked
        if not board.is_legal(move):  # cannot happen: only legal moves are offered; checked all the same
            raise AssertionError(f"{player.name} chose an illegal move {move} in {board.fen()}")
        record.choices.append(choice)
        board.push(move)
    if outcome is not None:
        record.result, record.ending = outcome.result(), TERMINATIONS[outcome.termination]
    record.seconds = time.perf_counter() - start
    return record


def to_pgn(record: GameRecord, white: str, black: str, event: str = "gLLM chess bot") -> chess.pgn.Game:
    """The game as PGN, each bot move commented with its logprob, probability and rank."""
    game = chess.pgn.Game.from_board(record.board)
    game.headers.update(Event=event, White=white, Black=black, Result=record.result,
                        Termination="normal" if record.finished else "unterminated")
    node: chess.pgn.GameNode = game
    for choice in record.choices:
        node = node.next()
        if choice is not None:
            rank = choice.ranking.index(choice.move) + 1
            node.comment = (f"logprob {choice.move.logprob:.2f}, p {choice.move.prob:.2f}, "
                            f"rank {rank}/{len(choice.ranking)}")
    node.comment = f"{node.comment}; {record.ending}" if node.comment else record.ending
    return game


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="a running gllm serve")
    p.add_argument("--serve", action="store_true", help="start a private runtime and stop it at the end")
    p.add_argument("--model", default=None, help="model for --serve (default: the runtime's default)")
    p.add_argument("--opponent", choices=["random", "self"], default="random")
    p.add_argument("--bot-plays", choices=["white", "black"], default="white", help="against the random mover")
    p.add_argument("--games", type=int, default=1)
    p.add_argument("--max-plies", type=int, default=200, help="stop a game after this many moves (result *)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 plays the best-ranked move")
    p.add_argument("--seed", type=int, default=0, help="seeds the random mover and the bot's sampling")
    p.add_argument("--fen", default=None, help="start from this position instead of the initial one")
    args = p.parse_args(argv)

    if args.serve:
        with LocalRuntime(args.model) as runtime:
            print(f"[started gllm serve on {runtime.endpoint}]", file=sys.stderr)
            return play(args, runtime.endpoint)
    return play(args, args.endpoint)


def play(args: argparse.Namespace, endpoint: str) -> int:
    with Client(endpoint, timeout=120) as client:
        model = client.info().model
        bot_name = f"gLLM bot ({model}, T={args.temperature:g})"
        for n in range(args.games):
            bot = BotPlayer(ChessBot(client, args.temperature, seed=args.seed + n), bot_name)
            if args.opponent == "self":
                white, black = bot, bot
            else:
                rival = RandomMover(seed=args.seed + n)
                white, black = (bot, rival) if args.bot_plays == "white" else (rival, bot)
            record = play_game(white, black, args.max_plies, args.fen)
            print(to_pgn(record, white.name, black.name), end="\n\n", flush=True)
            plies = len(record.board.move_stack)
            print(f"[game {n + 1}: {record.result} by {record.ending}, {plies} plies in {record.seconds:.1f} s]",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
