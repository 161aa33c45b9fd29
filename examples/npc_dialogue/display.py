"""How the village looks in a terminal: interleaved coloured streams, then a tidy transcript and timings.

Tokens are printed the moment they arrive, whoever they belong to, so several NPCs' words interleave on
screen exactly as the runtime produced them; each NPC has its own colour. Without colour (``--no-color``,
``NO_COLOR``, or output that is not a terminal) a ``[Name]`` tag marks each change of speaker instead.
After the exchange every reply is printed again on its own line, with a line of timings.

Structured replies arrive as JSON (``{"say": ..., "mood": ..., "action": ...}``); while they stream, only
the words of ``say`` are shown (``SpokenWords``), as a game would put them in a speech bubble, and the
rest appears in the transcript.

``--show-logprobs`` marks the tokens the model was unsure of (probability under a threshold): underlined
in colour, or wrapped in ``{...}`` without, and names each NPC's least certain token with its runners-up.
"""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from crowd import Exchange, Reply
    from gllm.client import Token

COLOURS = ["\x1b[33m", "\x1b[36m", "\x1b[32m", "\x1b[35m", "\x1b[34m", "\x1b[31m",
           "\x1b[93m", "\x1b[96m", "\x1b[92m", "\x1b[95m", "\x1b[94m", "\x1b[91m"]
RESET, DIM, BOLD, UNDERLINE = "\x1b[0m", "\x1b[2m", "\x1b[1m", "\x1b[4m"


def colour_wanted(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


class Terminal:
    def __init__(self, stream: TextIO = sys.stdout, colour: bool | None = None, show_logprobs: bool = False,
                 uncertain_below: float = 0.25, spoken_only: bool = False):
        self.out = stream
        self.spoken_only = spoken_only  # JSON replies: stream the words of "say" alone
        self._spoken: dict[str, SpokenWords] = {}
        self.colour = colour_wanted(stream) if colour is None else colour
        self.show_logprobs = show_logprobs
        self.uncertain_logprob = math.log(uncertain_below)
        self._speaker: str | None = None  # whose tokens were printed last; None at the start of a line
        self._colours: dict[str, str] = {}

    def _paint(self, name: str, text: str, extra: str = "") -> str:
        if not self.colour:
            return text
        colour = self._colours.setdefault(name, COLOURS[len(self._colours) % len(COLOURS)])
        return f"{colour}{extra}{text}{RESET}"

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def player(self, line: str, where: str, listeners: list[str]) -> None:
        heard = ", ".join(listeners) if listeners else "nobody"
        self._write(f"\n{BOLD if self.colour else ''}You{RESET if self.colour else ''} ({where}): {line}\n"
                    f"{self._dim(f'heard by {heard}')}\n")
        self._speaker = None
        self._spoken.clear()  # a new reply from everyone who answers

    def token(self, name: str, token: Token) -> None:
        text = token.text
        if self.spoken_only:
            text = self._spoken.setdefault(name, SpokenWords()).feed(text)
        if not text:
            return
        unsure = self.show_logprobs and token.logprob < self.uncertain_logprob
        if unsure and not self.colour:
            text = "{" + text + "}"
        if not self.colour and name != self._speaker:
            text = f"{' ' if self._speaker else ''}[{name}]{text}"
        self._speaker = name
        self._write(self._paint(name, text, UNDERLINE if unsure else ""))

    def interrupted(self, names: list[str]) -> None:
        self.note(f"(the player cuts in: {', '.join(names)} stop talking)")

    def transcript(self, exchange: Exchange) -> None:
        """Each reply in full, then timings: time to first token and decode speed per NPC."""
        self._write("\n" if self._speaker else "")  # end the streamed line, if one is open
        self._speaker = None
        for reply in exchange.replies:
            ending = " —" if reply.cancelled else ""
            label = f"{reply.npc.name} ({reply.npc.persona.role})"
            answer = reply.parsed
            if answer is not None:  # a structured answer: the line, then what the game reads from it
                text = f"{answer['say']}  [{answer['mood']}; {action_words(answer['action'])}]"
            else:  # one line per reply, whatever newlines the model wrote; a cut-off JSON reply, its words
                text = SpokenWords().feed(reply.text) if self.spoken_only else reply.text
                text = " ".join(text.split())
            self._write(f"  {self._paint(reply.npc.name, label)}: {text}{ending}\n")
            if self.show_logprobs:
                self._write(self._dim(f"    {least_sure(reply)}") + "\n")
        self._write(self._dim("  timing: " + " | ".join(timing(r) for r in exchange.replies)) + "\n")

    def note(self, text: str) -> None:
        """A line of its own, even in the middle of the NPCs' streams."""
        self._write(("\n" if self._speaker else "") + self._dim(text) + "\n")
        self._speaker = None

    def _dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.colour else text


class SpokenWords:
    """The characters of a JSON reply's ``"say"`` string as they stream in, escapes decoded; nothing else."""

    KEY = '"say"'
    ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": " ", "t": " ", "r": ""}

    def __init__(self) -> None:
        self._seen = ""  # the reply so far, up to the opening quote of the value once it is found
        self._inside = False
        self._done = False
        self._escaped = False  # a backslash was the last character
        self._skip = 0  # hex digits of a \\uXXXX escape still to come (left out)

    def feed(self, text: str) -> str:
        """The new spoken characters in ``text`` (maybe none)."""
        if self._done:
            return ""
        if not self._inside:
            self._seen += text
            at = self._seen.find(self.KEY)
            if at < 0:
                return ""
            rest = self._seen[at + len(self.KEY):].lstrip()
            if not rest.startswith(":") or '"' not in rest:
                return ""
            self._inside = True
            text = rest[rest.index('"') + 1:]
        spoken = []
        for ch in text:
            if self._skip:
                self._skip -= 1
            elif self._escaped:
                self._escaped = False
                if ch == "u":
                    self._skip = 4
                else:
                    spoken.append(self.ESCAPES.get(ch, ch))
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._done = True
                break
            else:
                spoken.append(ch)
        return "".join(spoken)


def action_words(action: dict) -> str:
    item = action.get("item")
    return action["type"] + (f" {item}" if item else "")


def timing(reply: Reply) -> str:
    ttft = "-" if reply.ttft_ms is None else f"{reply.ttft_ms / 1000:.2f} s"
    rate = "-" if reply.tokens_per_s is None else f"{reply.tokens_per_s:.1f} tok/s"
    cached = f", {reply.cached_tokens} cached" if reply.cached_tokens else ""
    return f"{reply.npc.name} ttft {ttft}, {rate} ({len(reply.tokens)} tok{cached})"


def least_sure(reply: Reply) -> str:
    """The reply's least likely sampled token and the model's top alternatives at that point."""
    tokens = [t for t in reply.tokens if t.text.strip()]
    if not tokens:
        return "no tokens"
    worst = min(tokens, key=lambda t: t.logprob)
    others = ", ".join(f"{text!r} {math.exp(lp):.0%}" for _, text, lp in (worst.top or [])[:3])
    return f"least sure of {worst.text!r} ({math.exp(worst.logprob):.0%}); the model's top choices: {others}"


class Silent(Terminal):
    """Prints nothing: for benchmarks and tests that only want the numbers."""

    def _write(self, text: str) -> None:
        pass
