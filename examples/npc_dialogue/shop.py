"""Gilda's stall: a shopkeeper who trades through tool calls, so the game, not the text, moves the goods.

    python examples/npc_dialogue/shop.py --serve      # start a runtime, play the scripted visit, stop
    python examples/npc_dialogue/shop.py              # use a running gllm serve

Each player line goes to the runtime with two tools, ``sell(item, price, say)`` and ``refuse(say)``, and
``tool_choice="required"``: the answer is always exactly one call, its arguments valid under the tool's
schema, parsed for the game (``Completion.tool_calls``). The ``item`` argument is an enum of what is on
the shelf right now, so the schema changes from one request to the next as stock runs out; the runtime
compiles a new grammar per request in about a millisecond. The game then checks the purse, moves goods
and coins, and tells the model what happened as a ``tool`` message, so the next answer knows it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from gllm.client import DEFAULT_ENDPOINT, Client, LocalRuntime, ToolCall
from npcs import LORE

PERSONA = ("You are Gilda, the cloth merchant of Ashford, who also sells odds and ends from her stall. You are "
           "shrewd but fair, and you never sell below half the list price. Use the tools to trade: sell names "
           "the item and your price, refuse says no.")
VISIT = [
    "Good day! I need some rope for the road.",
    "How much for that sword? I only have 30 silver left.",
    "Fine, then sell me the shield for 2 silver.",
    "Do you have any bread?",
]


@dataclass
class Stall:
    prices: dict[str, int] = field(default_factory=lambda: {"rope": 3, "bread": 1, "shield": 25, "sword": 40,
                                                            "lantern": 6})
    purse: int = 45  # the player's silver
    bought: list[str] = field(default_factory=list)

    def tools(self) -> list[dict]:
        """The two tools, with the shelf as it is now in ``sell``'s schema."""
        say = {"type": "string", "minLength": 1, "maxLength": 120}
        return [
            {"name": "sell", "description": "Sell one item from your stall to the traveller at a price in silver.",
             "parameters": {"type": "object", "additionalProperties": False, "required": ["item", "price", "say"],
                            "properties": {"item": {"enum": sorted(self.prices)},
                                           "price": {"type": "integer", "minimum": 1, "maximum": 200},
                                           "say": say}}},
            {"name": "refuse", "description": "Refuse the deal, and say why.",
             "parameters": {"type": "object", "additionalProperties": False, "required": ["say"],
                            "properties": {"say": say}}},
        ]

    def apply(self, call: ToolCall) -> str:
        """Carry out a call in the game; returns what happened, for the transcript and the model."""
        if call.name == "refuse":
            return "No trade."
        item, price = call.arguments["item"], call.arguments["price"]
        if price < self.prices[item] // 2:
            return f"Gilda would not really sell the {item} for {price} silver: no trade."
        if price > self.purse:
            return f"The traveller cannot pay {price} silver for the {item} (the purse holds {self.purse})."
        self.purse -= price
        self.bought.append(item)
        del self.prices[item]
        return f"The traveller paid {price} silver and took the {item}; {self.purse} silver left."


def visit(client: Client, stall: Stall, lines: list[str], seed: int | None = 0, out=sys.stdout) -> list[ToolCall]:
    """Say each line to Gilda; every answer is one tool call, which the stall carries out."""
    chat = [{"role": "system", "content": f"{LORE}\n\n{PERSONA}"}]
    calls = []
    for i, line in enumerate(lines):
        chat.append({"role": "user", "content": f"{line} (I have {stall.purse} silver.)"})
        done = client.complete(messages=chat, tools=stall.tools(), tool_choice="required", max_tokens=96,
                               temperature=0.7, top_p=0.9, seed=None if seed is None else seed + i)
        (call,) = done.tool_calls
        outcome = stall.apply(call)
        calls.append(call)
        args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items() if k != "say")
        print(f"You: {line}\nGilda: {call.arguments['say']}\n  -> {call.name}({args}): {outcome}\n", file=out)
        chat += [{"role": "assistant", "content": done.text}, {"role": "tool", "content": outcome}]
    print(f"Bought: {', '.join(stall.bought) or 'nothing'}; {stall.purse} silver left.", file=out)
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="a running gllm serve")
    p.add_argument("--serve", action="store_true", help="start a private runtime and stop it at the end")
    p.add_argument("--model", default=None, help="model for --serve (default: the runtime's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.serve:
        with LocalRuntime(args.model) as runtime, Client(runtime.endpoint, timeout=300) as client:
            visit(client, Stall(), VISIT, args.seed)
    else:
        with Client(args.endpoint, timeout=300) as client:
            visit(client, Stall(), VISIT, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
