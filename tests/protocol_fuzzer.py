"""A protocol fuzzer for a running ``gllm serve``: valid, malformed and random messages from several
connections at once, every reply checked against the protocol. ``test_protocol_fuzz.py`` runs a few
thousand messages; ``benchmarks/fuzz.py`` runs 100,000.

Each connection has one message in flight at a time, so the fuzzer knows what must come back: the same
validation the runtime runs (``admission.read_request`` with the runtime's own limits) says whether a
message is refused (one ``error``), a ``ping``/``info`` (one reply), a ``cancel``, ``inject`` or ``release``
(nothing: a ``ping`` follows to prove it), or a request (a stream ending in ``done``, ``scores`` or
``error``; one ``snapshot``, ``restored`` or ``error``). Streams are
cancelled at random, connections dropped mid-stream, and a reply that does not come within the timeout
is a hang. At the end the runtime must hold no KV block and no open request.
"""

from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from gllm.runtime import protocol
from gllm.runtime.admission import read_request
from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import ERROR_CODES, FINISH_REASONS, INFO_STATS, ProtocolError, encode

REPLY_TIMEOUT_S = 60.0
NASTY = [None, True, False, 0, -1, 1, 2**31, -(2**31) - 1, 2**63, -(2**63), 2**64 - 1, 0.5, -0.0, math.nan,
         math.inf, -math.inf, 1e308, "", "x", "x" * 300, "é\u0000\U0001F409", b"", b"bin", [], {}, [1, 2], {"a": 1},
         [[[[[[[[[[1]]]]]]]]]], msgpack.ExtType(1, b"x"), msgpack.Timestamp(1, 0), ["a"] * 20, list(range(300))]
FIELDS = ["type", "id", "prompt", "messages", "prompt_token_ids", "max_tokens", "temperature", "top_k", "top_p",
          "seed", "stop", "logprobs", "priority", "ignore_eos", "thinking", "candidates", "max_token", "", "ID", "json_schema",
          "grammar", "grammar_syntax", "regex", "choices", "tools", "tool_choice"]


class FuzzFailure(AssertionError):
    """The runtime broke the protocol: a wrong, extra, missing or late reply."""


# ------------------------------------------------------------------------------------------ messages
class MessageMaker:
    """Random client messages: valid requests, broken ones, random msgpack values and raw bytes."""

    def __init__(self, rng: random.Random, vocab_size: int, limits: ServerLimits):
        self.rng = rng
        self.vocab = vocab_size
        self.limits = limits
        self.serial = 0

    def next(self) -> list[bytes]:
        kind = self.rng.choices(["valid", "broken", "value", "bytes", "frames"], [30, 35, 10, 22, 3])[0]
        if kind == "valid":
            return [encode(self.valid())]
        if kind == "broken":
            return [encode(self.broken())]
        if kind == "value":
            return [encode(self.value(4))]
        if kind == "bytes":
            return [self.raw()]
        return [encode(self.valid()) for _ in range(self.rng.choice([0, 2, 3]))]

    def new_id(self) -> int | str:
        self.serial += 1
        return self.serial if self.rng.random() < 0.5 else f"f{self.serial}"

    def tokens(self, lo: int, hi: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(lo, hi))]

    def valid(self) -> dict[str, Any]:
        r = self.rng
        kind = r.choices(["generate", "score", "ping", "info", "cancel", "snapshot", "restore", "inject", "release"],
                         [50, 20, 12, 8, 10, 5, 3, 3, 2])[0]
        msg: dict[str, Any] = {"type": kind, "id": self.new_id()}
        if kind == "snapshot":
            msg.update(prompt_token_ids=self.tokens(1, 40))
        elif kind == "restore":  # never a valid state
            msg.update(state=r.randbytes(50))
        elif kind == "inject":
            msg.update(token_ids=self.tokens(1, 5))
        elif kind == "generate":
            msg.update(prompt_token_ids=self.tokens(1, 40), max_tokens=r.choice([1, 2, 4, 8, 200]))
            if r.random() < 0.5:
                msg.update(temperature=r.choice([0, 0.7, 1.5]), top_k=r.randint(0, 50), top_p=r.choice([0.5, 1.0]),
                           seed=r.randrange(2**64), logprobs=r.randint(0, 20), priority=r.randint(-3, 3),
                           ignore_eos=r.random() < 0.5, thinking=r.random() < 0.5)
        elif kind == "score":
            msg.update(prompt_token_ids=self.tokens(1, 30),
                       candidates=[self.tokens(1, 6) for _ in range(r.randint(1, 8))])
        return msg

    def broken(self) -> dict[str, Any]:
        """A valid message with one field changed, added or removed."""
        r = self.rng
        msg = self.valid()
        action = r.choice(["replace", "replace", "add", "drop", "deep", "big", "limit"])
        if action == "replace":
            msg[r.choice(FIELDS)] = r.choice(NASTY) if r.random() < 0.7 else self.value(3)
        elif action == "add":
            msg[r.choice(FIELDS + [1, "x" * 40])] = self.value(2)
        elif action == "drop":
            msg.pop(r.choice(list(msg)))
        elif action == "deep":
            nested: Any = "x"
            for _ in range(r.randint(5, 300)):
                nested = [nested] if r.random() < 0.5 else {"k": nested}
            msg[r.choice(FIELDS)] = nested
        elif action == "big":
            msg[r.choice(["prompt_token_ids", "stop", "candidates"])] = [[1]] * r.randint(10, 3000)
        else:  # just past one of the runtime's limits
            lim = self.limits
            msg = r.choice([
                {"type": "generate", "prompt_token_ids": [1] * (lim.max_prompt_tokens + 1)},
                {"type": "generate", "prompt_token_ids": [1], "max_tokens": lim.max_completion_tokens + 1},
                {"type": "generate", "prompt_token_ids": [1], "stop": ["s"] * (lim.max_stop_strings + 1)},
                {"type": "generate", "prompt_token_ids": [1], "stop": ["s" * (lim.max_stop_chars + 1)]},
                {"type": "score", "prompt_token_ids": [1], "candidates": [[1]] * (lim.max_candidates + 1)},
                {"type": "score", "prompt_token_ids": [1], "candidates": [[1] * (lim.max_candidate_tokens + 1)]},
                {"type": "ping", "padding": "x" * lim.max_message_bytes},
            ]) | {"id": self.new_id()}
        return msg

    def value(self, depth: int) -> Any:
        r = self.rng
        if depth <= 0 or r.random() < 0.4:
            return r.choice(NASTY[:24]) if r.random() < 0.5 else r.choice([r.randint(-(2**63), 2**64 - 1),
                                                                          r.random(), "".join(r.choices("abcé", k=5))])
        if r.random() < 0.5:
            return [self.value(depth - 1) for _ in range(r.randint(0, 4))]
        return {r.choice(FIELDS): self.value(depth - 1) for _ in range(r.randint(0, 4))}

    def raw(self) -> bytes:
        r = self.rng
        frame = encode(self.valid())
        how = r.choice(["random", "truncate", "flip", "append", "prefix", "empty"])
        if how == "random":
            return r.randbytes(r.randint(1, 300))
        if how == "truncate":
            return frame[: r.randrange(len(frame))]
        if how == "flip":
            data = bytearray(frame)
            for _ in range(r.randint(1, 4)):
                data[r.randrange(len(data))] = r.randrange(256)
            return bytes(data)
        if how == "append":
            return frame + r.randbytes(r.randint(1, 8))
        if how == "prefix":
            head = r.choice([b"\x91", b"\x81\xa1a", b"\xdd\xff\xff\xff\xff", b"\xdf\x00\x01\x00\x00"])
            return head * r.randint(1, 2000)
        return b""


# --------------------------------------------------------------------------------------------- replies
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _usage_timing_ok(msg: dict[str, Any]) -> bool:
    usage, timing = msg.get("usage"), msg.get("timing")
    return (isinstance(usage, dict) and all(_is_int(usage.get(k)) for k in ("prompt_tokens", "completion_tokens",
                                                                            "cached_tokens"))
            and isinstance(timing, dict)
            and all(timing.get(k) is None or _is_num(timing[k]) for k in ("queued_ms", "ttft_ms", "total_ms")))


def reply_problem(msg: Any) -> str | None:
    """What makes ``msg`` not a valid runtime-to-client message of protocol v1 (None when it is valid)."""
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return "not a map with a string 'type'"
    kind, rid = msg["type"], msg.get("id")
    if rid is not None and not (_is_int(rid) or isinstance(rid, str)):
        return "bad id"
    if kind == "token":
        top = msg.get("top")
        ok = (_is_int(msg.get("index")) and msg["index"] >= 0 and _is_int(msg.get("token_id"))
              and isinstance(msg.get("text"), str) and _is_num(msg.get("logprob")) and _is_int(msg.get("rank"))
              and msg["rank"] >= 1 and (top is None or (isinstance(top, list) and all(
                  isinstance(t, list) and len(t) == 3 and _is_int(t[0]) and isinstance(t[1], str) and _is_num(t[2])
                  for t in top))))
    elif kind == "done":
        ok = msg.get("finish_reason") in FINISH_REASONS and isinstance(msg.get("text"), str) and _usage_timing_ok(msg)
    elif kind == "scores":
        cands = msg.get("candidates")
        ok = isinstance(cands, list) and bool(cands) and _usage_timing_ok(msg) and all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("token_ids"), list)
            and _is_num(c.get("logprob")) and isinstance(c.get("token_logprobs"), list)
            and len(c["token_logprobs"]) == len(c["token_ids"]) for c in cands)
    elif kind == "error":
        ok = msg.get("code") in ERROR_CODES and isinstance(msg.get("message"), str) and bool(msg["message"])
    elif kind == "info":
        stats, limits = msg.get("stats"), msg.get("limits")
        ok = (isinstance(msg.get("model"), str) and _is_int(msg.get("vocab_size")) and _is_int(msg.get("max_seq_len"))
              and msg.get("protocol_version") == protocol.PROTOCOL_VERSION and isinstance(stats, dict)
              and all(_is_int(stats.get(k)) for k in INFO_STATS) and isinstance(limits, dict))
    elif kind == "pong":
        ok = True
    elif kind == "snapshot":
        ok = isinstance(msg.get("state"), bytes) and _is_int(msg.get("tokens"))
    elif kind == "restored":
        ok = _is_int(msg.get("tokens")) and isinstance(msg.get("pinned"), bool)
    else:
        return f"unknown type {kind!r}"
    return None if ok else f"a malformed {kind!r}"


# ----------------------------------------------------------------------------------------------- driver
def expectation(frames: list[bytes], limits: ServerLimits) -> tuple[str, Any]:
    """What the runtime must answer to ``frames``, and with which id: "error", "pong", "info", "stream" (a
    generate's tokens then its end), "scores" (or its error), or "silent" (a cancel)."""
    if len(frames) != 1:
        return "error", None
    try:
        req = read_request(frames[0], limits)
    except ProtocolError as exc:
        return "error", exc.request_id
    if isinstance(req, (protocol.Cancel, protocol.Inject, protocol.Release)):
        return "silent", req.id  # naming a request of an earlier message, long over
    return {protocol.Ping: "pong", protocol.Info: "info", protocol.Generate: "stream", protocol.Score: "scores",
            protocol.Snapshot: "scores", protocol.Restore: "scores"}[type(req)], req.id


@dataclass
class Pending:
    """What one connection waits for: the replies to its last message."""

    expect: str  # "error", "pong", "info", "stream" (generate), "scores" (score, snapshot, restore)
    id: Any
    sent: float
    frames: list[bytes]
    tokens: int = 0
    cancel_after: int | None = None


@dataclass
class FuzzReport:
    messages: int = 0
    replies: collections.Counter = field(default_factory=collections.Counter)  # by type, errors by code
    cancels: int = 0
    disconnects: int = 0
    seconds: float = 0.0


class Fuzzer:
    """Drives ``connections`` DEALERs against ``endpoint``; ``run`` raises ``FuzzFailure`` on a broken reply."""

    def __init__(self, endpoint: str, seed: int = 0, connections: int = 8, keys: Any = None):
        self.endpoint = endpoint
        self.rng = random.Random(seed)
        self.context = zmq.Context.instance()
        self.keys = keys
        self.socks: list[zmq.Socket] = []
        self.pending: dict[zmq.Socket, Pending | None] = {}
        probe = self._connect()
        info = self._ask(probe, {"type": "info", "id": "fuzz-info"})
        known = ServerLimits.__dataclass_fields__
        self.limits = ServerLimits(**{k: v for k, v in info["limits"].items() if k in known})
        self.maker = MessageMaker(self.rng, info["vocab_size"], self.limits)
        self.probe = probe
        for _ in range(connections):
            self.socks.append(self._connect())

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys:
            self.keys.apply(sock)
        sock.connect(self.endpoint)
        self.pending[sock] = None
        return sock

    def _ask(self, sock: zmq.Socket, message: dict[str, Any]) -> dict[str, Any]:
        sock.send(encode(message))
        if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
            raise FuzzFailure(f"no reply to {message} within {REPLY_TIMEOUT_S} s")
        return protocol.decode(sock.recv())

    def run(self, messages: int) -> FuzzReport:
        report, start = FuzzReport(), time.monotonic()
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        while report.messages < messages or any(self.pending.values()):
            for i, sock in enumerate(self.socks):
                if self.pending[sock] is None and report.messages < messages:
                    if self.rng.random() < 0.01:
                        sock = self._replace(poller, i, report)
                    self._send(sock, report)
                    report.messages += 1
            for sock, _ in poller.poll(100):
                while sock in self.pending and sock.poll(0):
                    self._on_reply(sock, protocol.decode(sock.recv()), report)
                    if self.pending.get(sock) and self.rng.random() < 0.002:  # drop it mid-stream
                        self._replace(poller, self.socks.index(sock), report)
            now = time.monotonic()
            for sock, p in self.pending.items():
                if p is not None and now - p.sent > REPLY_TIMEOUT_S:
                    raise FuzzFailure(f"hang: no reply within {REPLY_TIMEOUT_S} s to {p.frames[0][:80]!r} ({p.expect})")
        report.seconds = time.monotonic() - start
        return report

    def _replace(self, poller: zmq.Poller, i: int, report: FuzzReport) -> zmq.Socket:
        old = self.socks[i]
        poller.unregister(old)
        del self.pending[old]
        old.close(linger=0)
        report.disconnects += 1
        self.socks[i] = self._connect()
        poller.register(self.socks[i], zmq.POLLIN)
        return self.socks[i]

    def _send(self, sock: zmq.Socket, report: FuzzReport) -> None:
        frames = self.maker.next()
        expect, rid = expectation(frames, self.limits)
        sock.send_multipart(frames) if frames else sock.send(b"")
        if expect == "silent":  # a cancel gets no reply: a ping right behind it must be the next one
            expect, rid = "pong", f"sync-{report.messages}"
            sock.send(encode({"type": "ping", "id": rid}))
        cancel_after = self.rng.choice([0, 1, 3, None, None]) if expect == "stream" else None
        self.pending[sock] = Pending(expect, rid, time.monotonic(), frames or [b""], cancel_after=cancel_after)

    def _on_reply(self, sock: zmq.Socket, msg: Any, report: FuzzReport) -> None:
        p = self.pending[sock]
        problem = reply_problem(msg)
        if problem is None and p is None:
            problem = "a reply nobody asked for"
        if problem is None and msg["id"] != p.id:
            problem = f"id {msg['id']!r}, expected {p.id!r}"
        if problem is None:
            problem = self._check_kind(p, msg)
        if problem:
            sent = p.frames[0][:80] if p else None
            raise FuzzFailure(f"{problem}: {str(msg)[:300]} (after sending {sent!r})")
        report.replies[msg["type"] if msg["type"] != "error" else f"error:{msg['code']}"] += 1
        if msg["type"] == "token":
            p.tokens += 1
            limit = p.cancel_after if p.cancel_after is not None else 64
            if p.tokens == limit + 1:
                sock.send(encode({"type": "cancel", "id": p.id}))
                report.cancels += 1
        else:
            self.pending[sock] = None

    @staticmethod
    def _check_kind(p: Pending, msg: dict[str, Any]) -> str | None:
        kind = msg["type"]
        if p.expect == "stream":
            if kind == "token" and msg["index"] != p.tokens:
                return f"token index {msg['index']}, expected {p.tokens}"
            ok = kind in ("token", "done", "error")
        elif p.expect == "scores":  # one reply: scores, a snapshot or restored, an error, or done if cancelled
            ok = kind in ("scores", "snapshot", "restored", "error", "done")
        elif p.expect in ("pong", "info"):
            ok = kind == p.expect
        else:
            ok = kind == "error"
        return None if ok else f"a {kind!r} reply where {p.expect!r} was due"

    def settle(self, timeout: float = 60.0) -> dict[str, Any]:
        """Close every connection, then wait until the runtime holds nothing; returns its last ``stats``."""
        for sock in self.socks:
            sock.close(linger=0)
        self.socks.clear()
        deadline = time.monotonic() + timeout
        while True:
            stats = self._ask(self.probe, {"type": "info", "id": "settle"})["stats"]
            busy = {k: stats[k] for k in ("kv_blocks_in_use", "running", "waiting", "open_requests") if stats[k]}
            if not busy:
                return stats
            if time.monotonic() > deadline:
                raise FuzzFailure(f"the runtime still holds {busy} {timeout} s after the fuzzing ended")
            time.sleep(0.1)

    def close(self) -> None:
        for sock in [*self.socks, self.probe]:
            sock.close(linger=0)
