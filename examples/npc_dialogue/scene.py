"""The scripted scene: a traveller arrives in Ashford, talks to the crowd, cuts in, then visits the forge.

It runs without a keyboard (``village.py --scene``, ``make run``, the tests) and exercises everything the
interactive mode does: several NPCs answering at once, the prefix cache serving the shared lore, an
interrupt that cancels NPCs mid-sentence, memory of earlier turns, and earshot (only the blacksmith hears
the last line, said at the forge).
"""

from __future__ import annotations

from dataclasses import dataclass

from crowd import Exchange, Village
from gllm.client import Scores


@dataclass(frozen=True)
class Line:
    where: str
    text: str
    cut_in_after: int | None = None  # say this once the previous answers have produced this many tokens


SCENE = [
    Line("square", "Good morning! I have just arrived in Ashford. What should a traveller know about this place?"),
    Line("square", "I heard that wolves were seen near the old mill. Is that true?"),
    Line("square", "Sorry to cut in, but where can I find a hot meal and a bed for tonight?", cut_in_after=9),
    Line("forge", "Blacksmith, can you sharpen my sword before nightfall?"),
]


@dataclass
class SceneResult:
    primes: list[Scores]  # one per NPC, in order: usage.cached_tokens shows the lore served from cache
    exchanges: list[Exchange]


async def play_scene(village: Village, scene: list[Line] = SCENE) -> SceneResult:
    """Prime the prefix cache, then say each line; a line with ``cut_in_after`` interrupts the one before."""
    primes = await village.prime()
    exchanges = []
    for i, line in enumerate(scene):
        exchange = await village.start(line.text, line.where)  # interrupts the previous exchange, if running
        exchanges.append(exchange)
        following = scene[i + 1] if i + 1 < len(scene) else None
        if following is not None and following.cut_in_after is not None:
            await exchange.wait_for_tokens(following.cut_in_after)
        else:
            await village.finish()
    return SceneResult(primes, exchanges)
