"""Who may use the runtime: this machine only by default, CurveZMQ-authenticated clients beyond it.

The protocol itself has no passwords: a client that can reach the socket can use it. So a runtime on a
loopback address or an ipc:// path serves only this machine, and binding anywhere else requires
CurveZMQ, libzmq's own encryption and public-key authentication, unless the operator says ``--insecure``.
With CurveZMQ on, a ZAP handler (pyzmq's ``ThreadAuthenticator``) lets in only the client public keys
listed in ``--allowed-keys``; any other client, and any client without CurveZMQ, fails the handshake
and never gets a reply.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


def is_local(endpoint: str) -> bool:
    """True for ``ipc://`` and ``inproc://`` endpoints and for ``tcp://`` ones on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", a host name or an interface name: may be reachable from elsewhere
        return False


@dataclass(frozen=True)
class CurveServer:
    """The runtime's CurveZMQ identity and the client public keys it accepts (all Z85)."""

    secret_key: bytes
    allowed_keys: frozenset[bytes]

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CurveZMQ server; call before it binds."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)

    def start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler checking client keys for every CurveZMQ socket of ``context``; stop it at the end.
        Start it before the socket binds: libzmq lets a CurveZMQ client in when no ZAP handler is there."""
        auth = ThreadAuthenticator(context, log=logging.getLogger("gllm.runtime.zap"))
        auth.start()
        auth.configure_curve_callback("*", _AllowedKeys(self.allowed_keys))
        return auth


class _AllowedKeys:
    """The credentials provider ``ThreadAuthenticator`` asks about each client key (Z85)."""

    def __init__(self, keys: frozenset[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            log.debug("refused a CurveZMQ client with unknown key %s", key.decode(errors="replace"))
        return allowed
