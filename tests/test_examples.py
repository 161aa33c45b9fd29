"""The two examples against a real ``gllm serve`` with the default model: the NPC village and the chess bot.

One runtime serves the whole module. The village's scripted scene runs once (short answers, fixed seeds)
and several tests read its record; the chess bot plays two short games. The bot's scores are checked
against the same model run in-process (``LLMEngine.score``), which is what "the bot ranks moves by the
model's logprobs" means.
"""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gllm.client import AsyncClient, Client, LocalRuntime, Token
from gllm.engine import GeneratorParams, LLMEngine, ScoreRequest
from runtime_fixtures import build_tiny_llama, start_server, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
for folder in ("npc_dialogue", "chess_bot"):  # the examples are scripts, importable from their folders
    sys.path.insert(0, str(EXAMPLES / folder))

import crowd  # noqa: E402
import display  # noqa: E402
import npcs  # noqa: E402
import scene  # noqa: E402

try:  # the chess bot needs python-chess; without it only its tests are skipped
    import chess
    import chess.pgn

    import bot
    import play
except ImportError:
    chess = None
needs_chess = pytest.mark.skipif(chess is None, reason="the chess bot example needs python-chess (pip install chess)")

MODEL = "smollm2-135m-instruct"
MAX_SEQ_LEN = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # float32: batch shapes do not change its numbers, so streamed and scored logprobs compare tightly
    srv = start_server(MODEL, tmp_path_factory.mktemp("examples-log"), "--max-batch-size", "8",
                       "--max-seq-len", str(MAX_SEQ_LEN), "--dtype", "float32")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def engine():
    """The same model in this process: the oracle for the runtime's scores and the tokenizer for counts."""
    return LLMEngine(MODEL, GeneratorParams(max_batch_size=4, max_seq_len=MAX_SEQ_LEN), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- village
@pytest.fixture(scope="module")
def village_run(server):
    """Play the scripted scene once: three NPCs, 16-token answers, seeded, logprobs on, no colour."""
    out = io.StringIO()

    async def go():
        async with AsyncClient(server.endpoint, timeout=120) as client:
            village = crowd.Village(client, npcs.make_crowd(3), display.Terminal(out, colour=False, show_logprobs=True),
                                    crowd.Sampling(max_tokens=16, seed=0, logprobs=3), history_budget=120)
            result = await scene.play_scene(village)
            return village, result

    village, result = asyncio.run(go())
    return village, result, out.getvalue()


def test_scene_runs_with_three_npcs_answering_at_once(village_run):
    village, result, printed = village_run
    assert [n.persona.role for n in village.npcs] == ["blacksmith", "innkeeper", "guard"]
    first = result.exchanges[0]
    assert [r.npc.name for r in first.replies] == ["Bram", "Mira", "Tomas"]
    for reply in first.replies:
        assert reply.tokens and reply.result.finish_reason in ("stop", "length")
    # The three streams were produced together: each one's first token came before any of them ended.
    assert max(r.token_times[0] for r in first.replies) < min(r.token_times[-1] for r in first.replies)
    assert "timing: Bram ttft" in printed and "[Mira]" in printed and "least sure of" in printed
    # Earshot: the last line is said at the forge, which only the blacksmith hears.
    assert [r.npc.name for r in result.exchanges[-1].replies] == ["Bram"]


def test_streamed_json_replies_show_the_spoken_words_alone():
    """A JSON reply streams as speech: the characters of "say", escapes decoded, however tokens split it."""
    reply = '{"say": "Hello \\"friend\\", the mill\\u00e9 is \\\\ old.", "mood": "calm", "action": {"type": "none"}}'
    for size in (1, 2, 3, 7, len(reply)):
        words = display.SpokenWords()
        spoken = "".join(words.feed(reply[i:i + size]) for i in range(0, len(reply), size))
        assert spoken == 'Hello "friend", the mill is \\ old.', size
    out = io.StringIO()
    terminal = display.Terminal(out, colour=False, spoken_only=True)
    terminal.player("Hi", "square", ["Bram"])
    for piece in ('{"', 'say": "', "Good", ' day', '", "mood": "', "happy", '"}'):
        terminal.token("Bram", Token(index=0, token_id=0, text=piece, logprob=0.0, rank=1))
    assert out.getvalue().endswith("[Bram]Good day")
    # a reply cut off by the player is not whole JSON: the transcript shows the words said so far
    bram = SimpleNamespace(name="Bram", persona=SimpleNamespace(role="blacksmith"))
    cut = SimpleNamespace(npc=bram, cancelled=True, parsed=None, text='{"say": "Good day, trav', tokens=[],
                          ttft_ms=None, tokens_per_s=None, cached_tokens=0)
    terminal.transcript(SimpleNamespace(replies=[cut]))
    assert "Bram (blacksmith): Good day, trav —" in out.getvalue()


def test_each_npc_stream_is_its_own(village_run, server):
    _, result, _ = village_run
    for exchange in result.exchanges:
        for reply in exchange.replies:
            assert [t.index for t in reply.tokens] == list(range(len(reply.tokens)))
            assert len(reply.tokens) == reply.result.usage.completion_tokens
            streamed = "".join(t.text for t in reply.tokens)
            assert reply.result.text.startswith(streamed)  # equal, but for held-back text after a cancel
            if not reply.cancelled:
                assert streamed == reply.result.text
    # The strongest check: the model, given this NPC's own prompt, assigns exactly the logprobs that the
    # NPC's stream carried. Tokens that had crossed from another NPC's stream would not match.
    with Client(server.endpoint, timeout=120) as client:
        for reply in result.exchanges[0].replies:
            scored = client.score(messages=reply.messages, candidates=[[t.token_id for t in reply.tokens]])
            assert scored.candidates[0].token_logprobs == pytest.approx([t.logprob for t in reply.tokens], abs=1e-3)


def test_shared_lore_is_served_from_the_prefix_cache(village_run, engine):
    village, result, _ = village_run
    prompts = [engine.tokenizer.apply_chat_template([{"role": "system", "content": n.persona.system_prompt()}])
               for n in village.npcs]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    assert shared > 100  # the lore: more than six full 16-token blocks
    for prime in result.primes[1:]:  # the second and later NPCs find the lore cached by the first
        assert prime.usage.cached_tokens >= shared // 16 * 16 > 0
    for reply in result.exchanges[0].replies:  # and every answer reuses its NPC's lore and persona
        assert reply.cached_tokens >= reply.npc.fixed_tokens // 16 * 16 - 16 > 0


def test_interrupt_cancels_and_frees_every_kv_block(village_run, server):
    _, result, printed = village_run
    interrupted = result.exchanges[1]  # the wolves line; the player cuts in after a few tokens
    assert any(r.cancelled for r in interrupted.replies)
    assert all(r.result.finish_reason in ("stop", "length", "cancelled") for r in interrupted.replies)
    assert "(the player cuts in:" in printed and " —\n" in printed  # cut-off replies end with a dash
    with Client(server.endpoint) as client:
        wait_until(lambda: client.info().stats["kv_blocks_in_use"] == 0, timeout=30)
        stats = client.info().stats
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_structured_answers_are_json_the_game_reads(server):
    """With the reply schema, every NPC answer that ends is JSON with say, mood and action."""
    out = io.StringIO()

    async def go():
        async with AsyncClient(server.endpoint, timeout=300) as client:
            village = crowd.Village(client, npcs.make_crowd(3), display.Terminal(out, colour=False),
                                    crowd.Sampling(max_tokens=96, seed=3), history_budget=0)
            return await village.say("Good evening. Where can I buy a warm cloak?")

    exchange = asyncio.run(go())
    for reply in exchange.replies:
        assert reply.result.finish_reason in ("stop", "length")
        if reply.result.finish_reason == "stop":
            assert reply.result.structure_complete and reply.parsed is not None, reply.text
            assert f"{reply.parsed['say']}  [{reply.parsed['mood']}; " in out.getvalue()
        else:
            assert reply.result.structure_complete is False
    assert any(r.parsed for r in exchange.replies)


def test_shopkeeper_trades_through_tool_calls(server):
    import shop

    out = io.StringIO()
    stall = shop.Stall()
    before = dict(stall.prices)
    with Client(server.endpoint, timeout=300) as client:
        calls = shop.visit(client, stall, shop.VISIT[:3], seed=1, out=out)
    assert len(calls) == 3
    for call in calls:
        assert call.name in ("sell", "refuse") and 0 < len(call.arguments["say"]) <= 120
        if call.name == "sell":
            assert call.arguments["item"] in before and 1 <= call.arguments["price"] <= 200
    paid = {c.arguments["item"]: c.arguments["price"] for c in calls if c.name == "sell"}
    spent = sum(paid[item] for item in stall.bought)
    assert stall.purse == 45 - spent and all(item not in stall.prices for item in stall.bought)
    assert "Gilda:" in out.getvalue() and "Bought:" in out.getvalue()


def test_history_keeps_lore_and_persona_and_drops_oldest_turns():
    npc = npcs.Npc(npcs.CORE[0], history_budget=100, fixed_tokens=200)
    for i in range(5):  # each turn: a 20-token line (prompt grows by it) and a 26-token reply
        npc.remember(f"line {i}", f"reply {i}", prompt_tokens=200 + npc.history_tokens + 20, completion_tokens=26)
    assert [t.player for t in npc.history] == ["line 3", "line 4"]  # 50 tokens a turn, 100 allowed
    assert npc.history_tokens == 100
    messages = npc.messages("line 5")
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith(npcs.LORE)
    assert "You are Bram, the blacksmith" in messages[0]["content"]
    assert [m["content"] for m in messages[1:]] == ["line 3", "reply 3", "line 4", "reply 4", "line 5"]


def test_crowd_scales_and_earshot():
    crowd_16 = npcs.make_crowd(16)
    assert len({p.name for p in crowd_16}) == 16
    assert len({p.name for p in npcs.make_crowd(40)}) == 40
    assert [p.name for p in crowd_16 if npcs.within_earshot(p, "forge")] == ["Bram"] + [
        p.name for p in crowd_16[3:]]  # the square is 8 m from the forge
    assert not any(npcs.within_earshot(p, "mill") for p in crowd_16)


# ------------------------------------------------------------------------------------------ chess bot
def assert_legal_and_scored_like_the_engine(record, engine: LLMEngine) -> None:
    board = record.board.root()
    for move, choice in zip(record.board.move_stack, record.choices):
        assert move in board.legal_moves
        if choice is not None:
            assert sorted(c.strip() for c in choice.candidates) == sorted(board.san(m) for m in board.legal_moves)
            direct = engine.score(ScoreRequest(prompt=choice.prompt, candidates=choice.candidates))
            assert choice.scores == pytest.approx([c.logprob for c in direct.candidates], abs=1e-4)
            assert choice.ranking[0].logprob == max(choice.scores) and choice.move in choice.ranking
        board.push(move)


@needs_chess
def test_bot_plays_legal_moves_with_the_engines_scores(server, engine):
    with Client(server.endpoint, timeout=120) as client:
        me = play.BotPlayer(bot.ChessBot(client), "bot")
        record = play.play_game(me, play.RandomMover(seed=1), max_plies=8)
    assert len(record.board.move_stack) == 8 and record.result == "*"  # the cap ended it: unfinished
    assert_legal_and_scored_like_the_engine(record, engine)
    pgn = str(play.to_pgn(record, "bot", "random"))
    reread = chess.pgn.read_game(io.StringIO(pgn))
    assert list(reread.mainline_moves()) == record.board.move_stack
    assert "logprob" in pgn and reread.headers["Result"] == "*"


@needs_chess
def test_bot_plays_a_game_to_its_result(server, engine):
    # King and rook against king, 94 plies without a capture or pawn move: within 6 more plies the game
    # must end, by the fifty-move rule, or by capture of the rook (insufficient material), or by mate.
    fen = "8/8/3k4/8/8/8/8/R3K3 w - - 94 80"
    with Client(server.endpoint, timeout=120) as client:
        me = play.BotPlayer(bot.ChessBot(client, temperature=1.0, seed=3), "bot")
        record = play.play_game(me, play.RandomMover(seed=2), max_plies=20, fen=fen)
    assert record.finished and record.result in ("1-0", "1/2-1/2"), record.ending
    assert record.board.outcome(claim_draw=True) is not None
    assert_legal_and_scored_like_the_engine(record, engine)
    pgn = str(play.to_pgn(record, "bot", "random"))
    assert '[FEN "8/8/3k4/8/8/8/8/R3K3 w - - 94 80"]' in pgn and record.ending in pgn


class Scripted:
    name = "script"

    def __init__(self, moves: list[str]):
        self.moves = iter(moves)

    def choose(self, board):
        return board.parse_san(next(self.moves))


@needs_chess
@pytest.mark.parametrize("fen, moves, result, ending", [
    ("rnb1kbnr/pppp1ppp/8/4p3/6Pq/5P2/PPPPP2P/RNBQKBNR w KQkq - 1 3", [], "0-1", "checkmate"),
    ("7k/5Q2/6K1/8/8/8/8/8 b - - 0 1", [], "1/2-1/2", "stalemate"),
    # Black may claim before playing 4... Ng8, the move that would repeat the start position a third time.
    (None, ["Nf3", "Nf6", "Ng1", "Ng8", "Nf3", "Nf6", "Ng1"], "1/2-1/2", "threefold repetition (claimed)"),
    ("8/8/3k4/8/8/8/8/R3K3 w - - 98 80", ["Ra2"], "1/2-1/2", "fifty-move rule (claimed)"),
    ("8/8/8/8/8/3k4/1r6/K7 w - - 0 1", ["Kxb2"], "1/2-1/2", "insufficient material"),
])
def test_game_ends_by_the_rules(fen, moves, result, ending):
    both = Scripted(moves)  # one script for both colours: each side plays the script's next move
    record = play.play_game(both, both, fen=fen)
    assert (record.result, record.ending) == (result, ending)
    assert len(record.board.move_stack) == len(moves)


@needs_chess
def test_prompt_is_pgn_movetext():
    board = chess.Board()
    assert bot.prompt_for(board).endswith("\n\n1.")
    for san in ["e4", "e5", "Nf3"]:
        board.push_san(san)
    assert bot.movetext(board) == "1. e4 e5 2. Nf3"
    board.push_san("Nc6")
    assert bot.movetext(board) == "1. e4 e5 2. Nf3 Nc6 3."
    black_first = chess.Board("8/8/3k4/8/8/8/8/R3K3 b - - 0 40")
    assert bot.movetext(black_first) == "40..."
    assert '[FEN "8/8/3k4/8/8/8/8/R3K3 b - - 0 40"]' in bot.prompt_for(black_first)


class StandInStockfish:
    """Answers ``analyse`` as Stockfish does under MultiPV: every root move with a score (a fixed one per
    move, from its name), so the evaluation's bookkeeping can be checked without Stockfish."""

    def analyse(self, board, limit, multipv):
        cp = lambda move: sum(map(ord, move.uci())) % 400  # noqa: E731
        return [{"pv": [m], "score": chess.engine.PovScore(chess.engine.Cp(cp(m)), board.turn)}
                for m in board.legal_moves]  # fmt: skip


@needs_chess
def test_evaluation_ranks_each_position_with_and_without_an_adapter(server, engine, tmp_path):
    import chess.engine
    import evaluate
    import transformers

    from gllm.loader.registry import resolve
    from lora_fixtures import make_adapter

    path = resolve(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    make_adapter(hf.eval(), tmp_path / "chess", seed=5, r=4, std=0.1)
    engine.load_adapter("chess", tmp_path / "chess")
    samples = evaluate.positions_from(EXAMPLES / "chess_bot" / "games.pgn", every=40, first_ply=10)[:3]
    with Client(server.endpoint, timeout=120) as client:
        client.load_adapter("chess", str(tmp_path / "chess"))
        rows = evaluate.evaluate(client, StandInStockfish(), samples, depth=1, cap=1000.0, adapter="chess")
    for (_, _, board, _), row in zip(samples, rows):
        loss = evaluate.losses(StandInStockfish(), board, 1, 1000.0)
        moves = list(board.legal_moves)
        scored = engine.score(ScoreRequest(prompt=bot.prompt_for(board), adapter="chess",
                                           candidates=[" " + board.san(m) for m in moves]))  # fmt: skip
        top = moves[max(range(len(moves)), key=lambda i: scored.candidates[i].logprob)]
        assert row.adapter_move == board.san(top) and row.adapter_loss == loss[top]
        assert row.bot_loss == loss[board.parse_san(row.bot_move)]
    assert any(r.adapter_move != r.bot_move for r in rows)  # the adapter is strong enough to change a choice
    table = evaluate.summarize(rows)
    paired = table["bot - bot under the adapter (paired)"]["mean_cpl"]
    assert paired == pytest.approx(sum(r.bot_loss - r.adapter_loss for r in rows) / len(rows))
    settings = {"positions": 3, "every": 40, "first_ply": 10, "games": 1, "model": MODEL, "stockfish": "stand-in",
                "depth": 1, "cap": 1000.0, "score_ms_median": 1.0, "machine": "test", "adapter": "chess"}  # fmt: skip
    evaluate.write_results(rows, table, settings, tmp_path / "evaluate")
    text = (tmp_path / "evaluate.md").read_text()
    assert "| bot under the adapter (sum of logprobs, greedy) |" in text and "bot - bot under the adapter" in text


# ------------------------------------------------------------------------------------- --serve helper
def test_serve_local_starts_and_always_stops_its_runtime(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    with LocalRuntime(str(model)) as runtime:
        with Client(runtime.endpoint) as client:
            assert client.info().model == "tiny"
    assert runtime.proc.returncode == 0
    with pytest.raises(RuntimeError):
        with LocalRuntime(str(tmp_path / "no-such-model")):
            pass
