"""A chess player made of one ``score`` request per move: the model ranks every legal move, the bot plays one.

The prompt is the game so far as PGN move text (``1. e4 e5 2. Nf3``), after a few PGN header lines that
tell the model what kind of text this is. The candidates are all legal moves in SAN, each with the
leading space the model would write before it (``" Nc6"``): the runtime appends each candidate's own
tokens to the prompt's, so the space must be part of the candidate. A candidate's score is its
log-probability, the sum of its tokens' logprobs, which is exactly "how likely the model finds this move
text next". The bot plays the best one, or samples with a temperature over the scores normalised to a
distribution over the legal moves (a softmax of logprob / temperature).

Only legal moves are ever candidates, so the bot cannot play an illegal move, however confused the model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import chess

from gllm.client import Client

# Headers only set the scene; the players' names are made up so that no famous game is hinted at.
PGN_HEADERS = '[Event "Casual game"]\n[White "Player A"]\n[Black "Player B"]\n[Result "*"]\n\n'


@dataclass
class RankedMove:
    move: chess.Move
    san: str
    logprob: float  # log P(" " + san | game so far), from the runtime
    prob: float  # the move's share among the legal moves: softmax of the logprobs (temperature 1)
    num_tokens: int  # how many tokens the move text is; its logprob is a sum over them


@dataclass
class Choice:
    """The move the bot chose, with everything that went into the choice (for the PGN and for tests)."""

    move: RankedMove
    ranking: list[RankedMove]  # best first
    prompt: str
    candidates: list[str]  # as sent, in the order sent
    scores: list[float]  # the runtime's logprob of each candidate, in the order sent
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the runtime served from its prefix cache
    server_ms: float | None  # the request's time inside the runtime, arrival to scores


def movetext(board: chess.Board) -> str:
    """The game so far as PGN move text, ending where the next move goes (``"1. e4 e5 2."``).

    Starts from the board's root position, so a game set up from a FEN numbers its moves from there.
    """
    replay = board.root()
    parts: list[str] = []
    for move in board.move_stack:
        if replay.turn == chess.WHITE:
            parts.append(f"{replay.fullmove_number}.")
        elif not parts:  # a game that starts with Black to move
            parts.append(f"{replay.fullmove_number}...")
        parts.append(replay.san(move))
        replay.push(move)
    if replay.turn == chess.WHITE:
        parts.append(f"{replay.fullmove_number}.")
    elif not parts:
        parts.append(f"{replay.fullmove_number}...")
    return " ".join(parts)


def prompt_for(board: chess.Board) -> str:
    headers = PGN_HEADERS
    if board.root() != chess.Board():
        headers = headers.replace("\n\n", f'\n[SetUp "1"]\n[FEN "{board.root().fen()}"]\n\n')
    return headers + movetext(board)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    top = max(values)
    weights = [math.exp((v - top) / temperature) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


class ChessBot:
    """Ranks legal moves with a running ``gllm serve``; ``temperature`` 0 plays the top-ranked move.
    ``adapter``: the name of a LoRA adapter the runtime has loaded (a chess adapter, ``examples/lora``)."""

    def __init__(self, client: Client, temperature: float = 0.0, seed: int | None = None, adapter: str | None = None):
        self.client = client
        self.adapter = adapter
        self.temperature = temperature
        self.rng = random.Random(seed)

    def rank(self, board: chess.Board) -> Choice:
        """Score every legal move in one request; the returned choice's ``move`` is the top-ranked one."""
        moves = list(board.legal_moves)
        if not moves:
            raise ValueError("no legal moves: the game is over")
        sans = [board.san(m) for m in moves]
        prompt = prompt_for(board)
        candidates = [" " + san for san in sans]
        result = self.client.score(prompt, candidates=candidates, adapter=self.adapter)
        scores = [c.logprob for c in result.candidates]
        probs = softmax(scores)
        sizes = [len(c.token_ids) for c in result.candidates]
        ranking = sorted(map(RankedMove, moves, sans, scores, probs, sizes), key=lambda r: r.logprob, reverse=True)
        return Choice(ranking[0], ranking, prompt, candidates, scores, result.usage.prompt_tokens,
                      result.usage.cached_tokens, result.timing.total_ms)

    def choose(self, board: chess.Board) -> Choice:
        """Rank the moves and pick one: the best, or a sample at the bot's temperature."""
        choice = self.rank(board)
        if self.temperature > 0:
            weights = softmax([r.logprob for r in choice.ranking], self.temperature)
            choice.move = self.rng.choices(choice.ranking, weights)[0]
        return choice
