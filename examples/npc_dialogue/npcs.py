"""The village of Ashford: its shared lore, its people, and each person's memory of the conversation.

Every NPC's prompt starts with the same block of world lore, and only then says who this NPC is. The
runtime's prefix cache works on whole 16-token blocks of identical leading tokens, so putting the shared
lore first lets every NPC after the first reuse the lore's KV cache instead of recomputing it; a persona
placed first would make every prompt different from its first token on.

Each NPC remembers its own exchanges with the player, within a budget of tokens: when the history grows
past it, the oldest turns are dropped first, while the lore and persona are always kept. Token counts come
from the runtime's own ``usage`` figures (this client has no tokenizer), see ``Npc.remember``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LORE = """\
You are a character in Ashford, a village in a fantasy world. Facts everyone in Ashford knows:
- Ashford lies in the valley of the river Wend, in the kingdom of Carrow. It is late autumn.
- It has a forge, an inn called the Drowsy Ox, a mill on the river, and a wooden wall with one gate.
- Lady Orla rules the valley from Highmoor castle, a day's ride north.
- Wolves were seen near the old mill last week. The harvest was poor.
- Travellers say that bandits roam the south road.
- People here speak plainly and distrust strangers."""

STYLE = "Reply to the traveller in one or two short sentences, in character."
# With structured replies (the default) every answer is a JSON object the game reads: what the NPC says,
# its mood, and what it does. The runtime enforces the schema; the words below only help the model fill it.
MOODS = ["friendly", "neutral", "wary", "angry", "afraid", "amused"]
ACTIONS = ["none", "give", "sell", "point", "follow", "leave", "attack"]
REPLY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["say", "mood", "action"],
    "properties": {
        "say": {"type": "string", "minLength": 1, "maxLength": 160},
        "mood": {"enum": MOODS},
        "action": {"type": "object", "additionalProperties": False, "required": ["type"],
                   "properties": {"type": {"enum": ACTIONS}, "item": {"type": "string", "maxLength": 30}}},
    },
}
JSON_STYLE = ('Answer as JSON: {"say": what you say to the traveller, one or two short sentences, in character, '
              f'"mood": one of {", ".join(MOODS)}, "action": {{"type": one of {", ".join(ACTIONS)}, '
              '"item": the thing you give, sell or point at, if any}}.')

# Where things are on the village map, in metres; an NPC hears the player within EARSHOT_M of them.
PLACES: dict[str, tuple[float, float]] = {
    "square": (0.0, 0.0), "forge": (8.0, 0.0), "inn": (-6.0, 5.0), "gate": (0.0, -10.0), "mill": (40.0, 25.0),
}
EARSHOT_M = 12.0


@dataclass(frozen=True)
class Persona:
    name: str
    role: str
    place: str
    character: str  # who they are, in the second person

    def system_prompt(self, structured: bool = True) -> str:
        """Lore first (shared by everyone, so cached once), then this NPC's own lines."""
        return f"{LORE}\n\nYou are {self.name}, the {self.role}. {self.character} {JSON_STYLE if structured else STYLE}"


CORE = [
    Persona("Bram", "blacksmith", "forge",
            "You are broad, soot-stained and gruff, proud of your work, and you worry that the wolves will "
            "take the miller's sheep. You never give credit."),
    Persona("Mira", "innkeeper", "inn",
            "You run the Drowsy Ox. You are warm, curious and talkative, you love gossip, and a room costs "
            "two silver a night, stew included."),
    Persona("Tomas", "guard", "gate",
            "You keep the gate. You are young, dutiful and suspicious of strangers, and you ask every "
            "traveller for their name and business."),
]

# More villagers, for larger crowds (``--npcs N``); all of them stand around the square.
EXTRAS = [
    ("Hilde", "miller", "You grind the valley's grain and fear for your sheep."),
    ("Osric", "priest", "You tend the small chapel and speak softly of the old saints."),
    ("Wenna", "herbalist", "You sell remedies and know every plant along the river."),
    ("Cade", "hunter", "You track the wolves and trust nobody who cannot use a bow."),
    ("Lina", "baker", "You are up before dawn and know who owes money to whom."),
    ("Perrin", "fisherman", "You talk about the river as if it were alive."),
    ("Agna", "weaver", "You are sharp-tongued and notice every stranger's clothes."),
    ("Dunstan", "farmer", "You complain about the poor harvest and the lady's taxes."),
    ("Elsbet", "mayor", "You want calm in the village and no trouble with the castle."),
    ("Fenn", "stable hand", "You are shy and love the horses more than people."),
    ("Gilda", "merchant", "You trade cloth on the south road and fear the bandits."),
    ("Rowan", "bard", "You turn everything into a story or a song."),
    ("Ivo", "woodcutter", "You work the forest's edge and have heard the wolves at night."),
]


def make_crowd(n: int) -> list[Persona]:
    """The blacksmith, innkeeper and guard first, then as many villagers around the square as asked."""
    crowd = CORE[:n]
    for i in range(max(0, n - len(CORE))):
        name, role, character = EXTRAS[i % len(EXTRAS)]
        if i >= len(EXTRAS):
            name = f"{name} the younger" if i < 2 * len(EXTRAS) else f"{name} {i // len(EXTRAS) + 1}"
        crowd.append(Persona(name, role, "square", character))
    return crowd


def within_earshot(persona: Persona, where: str) -> bool:
    (x, y), (px, py) = PLACES[persona.place], PLACES[where]
    return math.hypot(x - px, y - py) <= EARSHOT_M


@dataclass
class Turn:
    player: str
    reply: str
    tokens: int  # what this turn adds to a later prompt, from the runtime's usage figures


# Chat-template tokens around a reply when it comes back as history: the assistant header
# ("<|im_start|>assistant\n", 3 tokens in ChatML) and the newline after its end marker. The end marker
# itself is the end-of-sequence token, already counted in ``completion_tokens`` when the model stopped.
REPLY_FRAMING_TOKENS = 4


@dataclass
class Npc:
    persona: Persona
    history_budget: int = 256  # tokens of past turns kept in the prompt
    history: list[Turn] = field(default_factory=list)
    fixed_tokens: int | None = None  # lore + persona + the assistant header: measured by ``Village.prime``

    @property
    def name(self) -> str:
        return self.persona.name

    @property
    def history_tokens(self) -> int:
        return sum(t.tokens for t in self.history)

    def messages(self, line: str, structured: bool = True) -> list[dict[str, str]]:
        """The chat to send for a new player line: lore and persona, the kept history, the line."""
        chat = [{"role": "system", "content": self.persona.system_prompt(structured)}]
        for turn in self.history:
            chat += [{"role": "user", "content": turn.player}, {"role": "assistant", "content": turn.reply}]
        return chat + [{"role": "user", "content": line}]

    def remember(self, line: str, reply: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Keep this exchange, then drop the oldest turns until the history fits the budget.

        The runtime reports the prompt's size; minus the fixed part and the kept history, that is exactly
        what the player's line added. The reply's own tokens are known too; only the re-tokenization of the
        reply when it is sent back as history can differ by a token or so from what was generated.
        """
        known = (self.fixed_tokens or 0) + self.history_tokens
        line_tokens = max(1, prompt_tokens - known)
        self.history.append(Turn(line, reply, line_tokens + completion_tokens + REPLY_FRAMING_TOKENS))
        while self.history and self.history_tokens > self.history_budget:
            self.history.pop(0)
