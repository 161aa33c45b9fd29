"""``load_adapter`` / ``unload_adapter``: LoRA adapters loaded and unloaded while the runtime serves.

The path in a ``load_adapter`` is read by the runtime, on its machine, so loading is a privilege of the
runtime's own machine and of authenticated clients: it is refused (``forbidden``) on a runtime that
serves an unauthenticated network address (``--insecure``); the endpoint checks that (``check_allowed``)
before the engine side sees the message. Loading reads and checks the file inside the serving loop
(streams pause for that long, typically milliseconds to a second for a small adapter). Free of torch, like
the rest of the protocol side: the engine's refusals are ``ValueError`` (``gllm.lora.AdapterError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gllm.runtime import protocol
from gllm.runtime.protocol import ProtocolError

if TYPE_CHECKING:
    from gllm.engine import LLMEngine

AdapterMessage = protocol.LoadAdapter | protocol.UnloadAdapter


def check_allowed(req: protocol.Request, allowed: bool) -> None:
    """Refuse (``forbidden``) an adapter message from a client that may not make the runtime read files."""
    if isinstance(req, (protocol.LoadAdapter, protocol.UnloadAdapter)) and not allowed:
        raise ProtocolError("forbidden", "this runtime serves an unauthenticated network address (--insecure), so "
                                         "clients may not make it read files; load adapters with gllm serve "
                                         "--adapter, or serve on loopback or with CurveZMQ", req.id)  # fmt: skip


def handle(engine: LLMEngine, req: AdapterMessage) -> dict[str, Any]:
    """Load or unload; return the ``adapters`` reply, or raise ``ProtocolError`` (nothing changed)."""
    try:
        if isinstance(req, protocol.LoadAdapter):
            engine.load_adapter(req.name, req.path)
        else:
            engine.unload_adapter(req.name)
    except ValueError as exc:  # AdapterError: a bad file, a name in use or unknown
        raise ProtocolError("bad_request", str(exc), req.id) from None
    return protocol.adapters_message(req.id, loaded(engine))


def loaded(engine: LLMEngine) -> list[str]:
    """Names of the engine's adapters, sorted (as ``info`` lists them)."""
    return sorted(engine.adapters.adapters)
