"""Many NPCs answering at once over one connection: the streaming, interrupt and memory logic.

``Village.start(line, where)`` sends one ``generate`` request per NPC within earshot, all at once on one
``AsyncClient``, and returns an ``Exchange``: one task per NPC reads that NPC's own stream (the client
routes replies by request id, so streams cannot cross) and hands each token to the display as it arrives.
The runtime batches the requests together, so all NPCs advance a token per engine step and their words
interleave. ``Exchange.interrupt()`` cancels the NPCs still talking; the runtime ends their streams with
``finish_reason == "cancelled"`` and frees their KV blocks.

``Village.prime()`` scores each NPC's fixed prompt (lore + persona) once, one after the other. That puts
the shared lore, then each persona, into the runtime's prefix cache before the player says anything,
the way a game would at level load, and it tells each NPC how many tokens its fixed prompt is.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass, field

from display import Terminal
from gllm.client import AsyncClient, AsyncStream, Completion, Scores, Token
from npcs import ACTIONS, MOODS, REPLY_SCHEMA, Npc, Persona, within_earshot


@dataclass
class Sampling:
    max_tokens: int = 96
    temperature: float = 0.7  # small chat models answer coherently when sampled; greedy tends to loop
    top_p: float = 0.9
    seed: int | None = None  # None: different answers each run
    logprobs: int = 0  # top alternatives per token, for --show-logprobs
    ignore_eos: bool = False  # benchmarks: exactly max_tokens per NPC
    structured: bool = True  # answers are JSON under npcs.REPLY_SCHEMA (say, mood, action); False: free text
    json_prompt: bool | None = None  # ask for JSON in the prompt (default: when structured); benchmarks
                                     # ask without the schema to count how often a model manages alone


    @property
    def asks_json(self) -> bool:
        return self.structured if self.json_prompt is None else self.json_prompt


def schema_valid(value: object) -> bool:
    """Whether a decoded answer has the shape of ``REPLY_SCHEMA`` (checked by hand: the example needs no
    JSON Schema library, and with ``structured`` on the runtime already guarantees it)."""
    if not isinstance(value, dict) or set(value) != {"say", "mood", "action"}:
        return False
    action = value["action"]
    return (isinstance(value["say"], str) and 0 < len(value["say"]) <= 160 and value["mood"] in MOODS
            and isinstance(action, dict) and action.get("type") in ACTIONS and set(action) <= {"type", "item"}
            and isinstance(action.get("item", ""), str) and len(action.get("item", "")) <= 30)


@dataclass
class Reply:
    npc: Npc
    line: str
    messages: list[dict[str, str]]  # the chat sent: lore and persona, kept history, the line
    stream: AsyncStream
    sent_at: float
    tokens: list[Token] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    result: Completion | None = None

    @property
    def text(self) -> str:
        return self.result.text if self.result else "".join(t.text for t in self.tokens)

    @property
    def cancelled(self) -> bool:
        return self.result is not None and self.result.finish_reason == "cancelled"

    @property
    def cached_tokens(self) -> int:
        return self.result.usage.cached_tokens if self.result else 0

    @property
    def parsed(self) -> dict | None:
        """The answer as the game reads it ({say, mood, action}), when it is whole JSON under the schema."""
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        return value if schema_valid(value) else None

    @property
    def ttft_ms(self) -> float | None:
        """From sending the request to receiving its first token, as the game sees it."""
        return (self.token_times[0] - self.sent_at) * 1000 if self.token_times else None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: the tokens after the first, over the time after the first."""
        if len(self.token_times) < 2:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


class Exchange:
    """One player line and the replies it started; await ``wait()`` for them all to end."""

    def __init__(self, line: str, where: str, replies: list[Reply], display: Terminal):
        self.line = line
        self.where = where
        self.replies = replies
        self.display = display
        self.tokens_seen = 0
        self._progress = asyncio.Event()
        self._tasks = [asyncio.create_task(self._read(r)) for r in replies]

    async def _read(self, reply: Reply) -> None:
        async for token in reply.stream:
            reply.tokens.append(token)
            reply.token_times.append(time.perf_counter())
            self.tokens_seen += 1
            self._progress.set()
            self.display.token(reply.npc.name, token)
        reply.result = reply.stream.result

    async def wait(self) -> list[Reply]:
        await asyncio.gather(*self._tasks)
        return self.replies

    async def wait_for_tokens(self, n: int) -> None:
        """Until ``n`` tokens have arrived in all, or every reply has ended."""
        while self.tokens_seen < n and not all(t.done() for t in self._tasks):
            self._progress.clear()
            waiter = asyncio.create_task(self._progress.wait())
            await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def interrupt(self) -> list[Npc]:
        """Cancel every NPC still talking; returns them. Their streams end with ``cancelled``."""
        talking = [r for r in self.replies if r.result is None]
        for reply in talking:
            await reply.stream.cancel()
        if talking:
            self.display.interrupted([r.npc.name for r in talking])
        return [r.npc for r in talking]


class Village:
    """The NPCs, the connection to the runtime, and how to send the player's lines to them."""

    def __init__(self, client: AsyncClient, personas: list[Persona], display: Terminal,
                 sampling: Sampling | None = None, history_budget: int = 256):
        self.client = client
        self.npcs = [Npc(p, history_budget) for p in personas]
        self.display = display
        self.sampling = sampling or Sampling()
        self.turn = 0
        self.current: Exchange | None = None

    async def prime(self) -> list[Scores]:
        """Score each NPC's fixed prompt, in turn, so lore and personas sit in the prefix cache."""
        results = []
        for npc in self.npcs:
            system = npc.persona.system_prompt(self.sampling.asks_json)
            scores = await self.client.score(messages=[{"role": "system", "content": system}], candidates=["Hello"],
                                             affinity=npc.name)
            npc.fixed_tokens = scores.usage.prompt_tokens
            results.append(scores)
        return results

    def listeners(self, where: str) -> list[Npc]:
        return [npc for npc in self.npcs if within_earshot(npc.persona, where)]

    async def start(self, line: str, where: str = "square") -> Exchange:
        """Send the line to everyone within earshot at once; interrupts an exchange still running."""
        if self.current is not None:
            await self.current.interrupt()
            await self.finish()
        self.turn += 1
        listeners = self.listeners(where)
        self.display.player(line, where, [n.name for n in listeners])
        s = self.sampling
        replies = []
        for npc in listeners:
            seed = None if s.seed is None else (s.seed + 1000 * self.turn + zlib.crc32(npc.name.encode())) % 2**63
            messages = npc.messages(line, s.asks_json)
            stream = self.client.generate(messages=messages, max_tokens=s.max_tokens,
                                          temperature=s.temperature, top_p=s.top_p, seed=seed,
                                          logprobs=s.logprobs or None, ignore_eos=s.ignore_eos or None,
                                          json_schema=REPLY_SCHEMA if s.structured else None,
                                          affinity=npc.name)  # a cluster keeps each NPC on one replica
            sent_at = time.perf_counter()
            await stream.start()  # sent now, so all NPCs arrive in the same engine step
            replies.append(Reply(npc, line, messages, stream, sent_at))
        self.current = Exchange(line, where, replies, self.display)
        return self.current

    async def finish(self) -> Exchange | None:
        """Wait for the current exchange to end, print its transcript and store it in the NPCs' memories."""
        exchange, self.current = self.current, None
        if exchange is None:
            return None
        for reply in await exchange.wait():
            text = reply.text.strip() + (" —" if reply.cancelled else "")
            usage = reply.result.usage
            reply.npc.remember(reply.line, text, usage.prompt_tokens, usage.completion_tokens)
        self.display.transcript(exchange)
        return exchange

    async def say(self, line: str, where: str = "square") -> Exchange:
        """Send a line and wait for every answer."""
        await self.start(line, where)
        return await self.finish()
