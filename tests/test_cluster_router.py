"""The cluster's routing rules, without Ray: affinity, longest cached prefix, least loaded, dead replicas."""

from __future__ import annotations

import pytest

from gllm.cluster.prefix import CHUNK_CHARS, prefix_keys
from gllm.cluster.router import Router

LORE = "Ashford is a village of millers and weavers under the shadow of Highmoor castle. " * 6


def chat(persona: str, *turns: str) -> dict:
    messages = [{"role": "system", "content": LORE + persona}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"type": "generate", "id": 1, "messages": messages}


def router(*replicas: str, capacity: int = 8, max_imbalance: int = 2, policy: str = "affinity") -> Router:
    r = Router(capacity, max_imbalance, policy)
    r.update(replicas)
    return r


def test_prefix_keys_follow_the_prompt_as_sent():
    a = prefix_keys(chat("You are Mara, the miller.", "Hello"))
    b = prefix_keys(chat("You are Tom, the smith.", "Hello"))
    shared = len(LORE) // CHUNK_CHARS  # whole pieces of lore are the same for both NPCs
    assert a[:shared] == b[:shared] and a[shared + 1] != b[shared + 1]
    longer = prefix_keys(chat("You are Mara, the miller.", "Hello", "Good day to you.", "Any news?"))
    assert longer[: len(a)] == a  # a conversation that grows keeps its earlier keys
    assert prefix_keys({"prompt_token_ids": list(range(40))})[:2] == prefix_keys({"prompt_token_ids": list(range(33))})[:2]
    assert sum(w for _, w in prefix_keys({"prompt": "x" * 150})) == 150
    assert prefix_keys({"type": "ping"}) == []


def test_affinity_keeps_a_conversation_on_its_replica():
    r = router("a", "b")
    first = r.route("npc-1", [])
    other = "b" if first == "a" else "a"
    assert sorted(r.route(None, []) for _ in range(3)) == sorted([first, other, other])  # by load
    assert all(r.route("npc-1", []) == first for _ in range(3))  # busier, and yet it holds the cache
    assert (r.load(first), r.load(other)) == (5, 2)
    assert r.route(1, []) is not None and r.route("1", []) is not None  # 1 and "1" are two keys


def test_affinity_waits_for_room_on_its_replica_rather_than_moving():
    r = router("a", "b", capacity=2)
    home = r.route("npc", [])
    assert r.route("npc", []) == home
    assert r.route("npc", []) is None  # full: the request waits in the front end
    r.release(home)
    assert r.route("npc", []) == home


def test_the_longest_cached_prefix_wins_within_the_imbalance_bound():
    r = router("a", "b", max_imbalance=2)
    mara = chat("You are Mara, the miller.", "Hello")
    home = r.route(None, prefix_keys(mara))
    other = "b" if home == "a" else "a"
    # The same conversation one turn on: its whole earlier prompt is cached on ``home``.
    on = prefix_keys(chat("You are Mara, the miller.", "Hello", "Well met.", "Where is the mill?"))
    assert r.route(None, on) == home  # home has 1 open, other 0: within the bound
    assert r.matched(home, on) > r.matched(other, on) == 0
    assert r.route(None, on) == home  # 2 more open than ``other``: still within the bound
    assert r.route(None, on) == other  # 3 more: over it, so the least loaded
    assert r.matched(other, on) == r.matched(home, on)  # other holds the prompt now too ...
    assert r.route(None, on) == other  # ... and equal matches go to the less loaded
    assert (r.load(home), r.load(other)) == (3, 2)


def test_least_loaded_and_ties_take_turns():
    r = router("a", "b", "c")
    first = [r.route(None, []) for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"]
    r.release("b")
    assert r.route(None, []) == "b"
    assert r.route(None, [], exclude=["a", "c"]) == "b"


def test_a_dead_replica_gets_nothing_and_its_conversations_move():
    r = router("a", "b")
    home = r.route("npc", [])
    other = "b" if home == "a" else "a"
    r.fail(home)
    assert r.route("npc", []) == other  # re-placed, then pinned there
    r.update(["a", "b"])  # a stale report that still lists the dead one
    assert r.healthy == [other]
    assert r.route("npc", []) == other
    assert [row["healthy"] for row in r.view()] == [True, False]
    r.fail(other)
    assert r.route("npc", []) is None and r.target("npc") is None


def test_messages_that_open_no_request_follow_the_affinity():
    r = router("a", "b")
    home = r.route("npc", [])
    assert r.target("npc") == home
    new = r.target("saved-game")
    assert r.route("saved-game", []) == new


def test_round_robin_ignores_keys_and_prefixes():
    r = router("a", "b", policy="round-robin")
    keys = prefix_keys(chat("You are Mara.", "Hi"))
    got = [r.route("npc", keys) for _ in range(4)]
    assert sorted(got) == ["a", "a", "b", "b"] and got[0] != got[1]
    with pytest.raises(ValueError, match="routing policy"):
        Router(4, 1, policy="random")
