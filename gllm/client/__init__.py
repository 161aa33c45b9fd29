"""Python client for ``gllm serve`` (protocol v1 over ZeroMQ + msgpack); needs pyzmq and msgpack, not torch.

    from gllm.client import Client

    with Client("tcp://127.0.0.1:5555") as client:
        stream = client.generate(messages=[{"role": "user", "content": "Hello!"}], temperature=0.7, top_p=0.9)
        for token in stream:
            print(token.text, end="", flush=True)
        print(stream.result.finish_reason, stream.result.usage)

``AsyncClient`` is the same for asyncio code (``async for token in client.generate(...)``).
"""

from gllm.client.aio import AsyncClient, AsyncStream
from gllm.client.messages import (
    Candidate,
    Completion,
    Info,
    Restored,
    RuntimeTimeout,
    Scores,
    ServerError,
    Snapshot,
    Timing,
    Token,
    ToolCall,
    Usage,
)
from gllm.client.local import LocalRuntime
from gllm.client.sync import Client, Stream
from gllm.runtime.protocol import DEFAULT_ENDPOINT

__all__ = [
    "LocalRuntime",
    "DEFAULT_ENDPOINT",
    "AsyncClient",
    "AsyncStream",
    "Candidate",
    "Client",
    "Completion",
    "Info",
    "Restored",
    "RuntimeTimeout",
    "Scores",
    "ServerError",
    "Snapshot",
    "Stream",
    "Timing",
    "Token",
    "ToolCall",
    "Usage",
]
