"""Talk to a village of NPCs who all answer at once, streamed from one gLLM runtime.

    python examples/npc_dialogue/village.py --serve --scene         # start a runtime, play the scene, stop
    gllm serve &                                                    # or use a runtime that is running
    python examples/npc_dialogue/village.py                         # type lines; a new line interrupts
    python examples/npc_dialogue/village.py --npcs 8 --show-logprobs

In the interactive mode, type a line and press Enter: every NPC within earshot answers. Typing a new line
while they talk cuts them off. ``/go PLACE`` walks elsewhere (square, forge, inn, gate, mill), ``/who``
lists who is around, ``/quit`` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

from crowd import Sampling, Village
from display import Terminal
from gllm.client import DEFAULT_ENDPOINT, AsyncClient, ServerError
from npcs import PLACES, make_crowd
from scene import play_scene
from gllm.client import LocalRuntime

HELP = "Type a line and press Enter (a new line interrupts whoever is talking); /go PLACE, /who, /quit."


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines typed on stdin, read by a thread so that the NPCs keep streaming while the player types."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()
    return queue


async def converse(village: Village, where: str) -> None:
    """The interactive loop: each line starts an exchange; a line that arrives mid-exchange interrupts it."""
    lines = stdin_lines(asyncio.get_running_loop())
    village.display.note(HELP)
    while True:
        next_line = asyncio.create_task(lines.get())
        while village.current is not None and not next_line.done():
            talking = asyncio.ensure_future(village.current.wait())
            await asyncio.wait([next_line, talking], return_when=asyncio.FIRST_COMPLETED)
            if talking.done():
                await village.finish()
        line = await next_line
        if line is None:  # end of input: let them finish their sentences
            await village.finish()
            return
        if line == "/quit":
            if village.current is not None:
                await village.current.interrupt()
            await village.finish()
            return
        if line.startswith("/go"):
            place = line[3:].strip()
            if place in PLACES:
                where = place
                village.display.note(f"You walk to the {where}.")
            else:
                village.display.note(f"Places: {', '.join(PLACES)}")
        elif line == "/who":
            village.display.note(", ".join(f"{n.name} the {n.persona.role} ({n.persona.place})" for n in village.npcs))
        elif line:
            await village.start(line, where)


async def run(args: argparse.Namespace, endpoint: str) -> int:
    display = Terminal(colour=False if args.no_color else None, show_logprobs=args.show_logprobs)
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, logprobs=3 if args.show_logprobs else 0, structured=not args.free_text)
    async with AsyncClient(endpoint, timeout=300) as client:
        village = Village(client, make_crowd(args.npcs), display, sampling, args.history_tokens)
        if args.scene:
            result = await play_scene(village)
            cached = ", ".join(f"{n.name} {s.usage.cached_tokens}/{s.usage.prompt_tokens}"
                               for n, s in zip(village.npcs, result.primes))
            display.note(f"\n[prefix cache when priming lore + persona, cached/prompt tokens: {cached}]")
        else:
            await village.prime()
            await converse(village, args.where)
        stats = (await client.info()).stats
        display.note(f"[runtime: {stats['kv_blocks_in_use']} KV blocks in use, {stats['kv_blocks_cached']} kept "
                     f"for prefix reuse; {stats['cached_prompt_tokens']} of {stats['prompt_tokens']} prompt "
                     "tokens served from the cache so far]")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="a running gllm serve")
    p.add_argument("--serve", action="store_true", help="start a private runtime and stop it at the end")
    p.add_argument("--model", default=None, help="model for --serve (default: the runtime's default)")
    p.add_argument("--scene", action="store_true", help="play the scripted scene and exit")
    p.add_argument("--npcs", type=int, default=3, help="how many NPCs (3: blacksmith, innkeeper, guard)")
    p.add_argument("--where", choices=list(PLACES), default="square", help="where the player stands")
    p.add_argument("--max-tokens", type=int, default=96, help="longest answer, in tokens")
    p.add_argument("--free-text", action="store_true",
                   help="plain answers instead of JSON (say, mood, action) under the reply schema")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None, help="make the answers repeatable")
    p.add_argument("--history-tokens", type=int, default=256, help="each NPC's memory of past turns, in tokens")
    p.add_argument("--show-logprobs", action="store_true", help="mark tokens the model was unsure of")
    p.add_argument("--no-color", action="store_true")
    args = p.parse_args(argv)
    if args.npcs < 1:
        p.error("--npcs must be at least 1")
    try:
        if args.serve:
            with LocalRuntime(args.model, max_batch_size=max(8, args.npcs)) as runtime:
                return asyncio.run(run(args, runtime.endpoint))
        return asyncio.run(run(args, args.endpoint))
    except KeyboardInterrupt:
        return 130
    except ServerError as exc:
        print(f"the runtime refused a request: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
