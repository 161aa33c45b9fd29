"""The runtime: ``gllm serve``, a ZeroMQ ROUTER in front of the engine, speaking protocol v1.

    gllm serve --model smollm2-135m-instruct --bind tcp://127.0.0.1:5555

``protocol`` (message schemas, validation, msgpack encoding) imports neither torch nor zmq, so clients can
use it; ``server`` holds the engine loop, ``cli`` the command line, ``admission`` the checks of every size
a client controls against ``ServerLimits``, ``access`` and ``keys`` CurveZMQ for non-loopback addresses.
See ``docs/protocol.md`` for the wire.
"""

from gllm.runtime.limits import ServerLimits
from gllm.runtime.protocol import PROTOCOL_VERSION, ProtocolError

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "ServerLimits"]
