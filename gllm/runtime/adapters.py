"""``load_adapter`` / ``unload_adapter``: LoRA adapters loaded and unloaded while the runtime serves.

The path in a ``load_adapter`` is read by the runtime, on its machine, so loading is a privilege of the
runtime's own machine and of authenticated clients: it is refused (``forbidden``) on a runtime that
serves an unauthenticated network address (``--insecure``). Loading reads and checks the file inside
the serving loop (streams pause for that long, typically milliseconds to a second for a small adapter).
"""

from __future__ import annotations

from typing import Any

from gllm.engine import LLMEngine
from gllm.lora import AdapterError
from gllm.runtime import protocol
from gllm.runtime.protocol import ProtocolError


def handle(engine: LLMEngine, req: protocol.LoadAdapter | protocol.UnloadAdapter, allowed: bool) -> dict[str, Any]:
    """Load or unload; return the ``adapters`` reply, or raise ``ProtocolError`` (nothing changed)."""
    if not allowed:
        raise ProtocolError("forbidden", "this runtime serves an unauthenticated network address (--insecure), so "
                                         "clients may not make it read files; load adapters with gllm serve "
                                         "--adapter, or serve on loopback or with CurveZMQ", req.id)  # fmt: skip
    try:
        if isinstance(req, protocol.LoadAdapter):
            engine.load_adapter(req.name, req.path)
        else:
            engine.unload_adapter(req.name)
    except AdapterError as exc:
        raise ProtocolError("bad_request", str(exc), req.id) from None
    return protocol.adapters_message(req.id, loaded(engine))


def loaded(engine: LLMEngine) -> list[str]:
    """Names of the engine's adapters, sorted (as ``info`` lists them)."""
    return sorted(engine.adapters.adapters)
