"""CurveZMQ key pairs as text files: ``gllm keygen`` writes them; the runtime and the clients read them.

A key is 32 bytes written in Z85 (ZeroMQ's text encoding: 40 printable characters) on a line of its own.
``NAME.key`` holds a secret key and is readable by its owner only (whoever reads it can pose as that
party); ``NAME.pub`` holds the public key, which is safe to share. Give the server's public key to its
clients, and list the clients' public keys in the file or folder the server's ``--allowed-keys`` names.
Lines starting with ``#`` are comments, so a folder of ``.pub`` files or one concatenated list both work.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import zmq
from zmq.utils import z85

KEY_CHARS = 40  # Z85 of 32 bytes

KeySource = Union[str, bytes, os.PathLike]  # a Z85 key itself, or the path of a key file


def parse_key(text: str | bytes, where: str) -> bytes:
    """A Z85 key as the bytes libzmq takes; ``where`` says in errors where the text came from."""
    key = text.strip().encode("ascii", "replace") if isinstance(text, str) else text.strip()
    try:
        ok = len(key) == KEY_CHARS and len(z85.decode(key)) == 32
    except Exception:  # characters outside Z85's alphabet, or a group that overflows
        ok = False
    if not ok:
        raise ValueError(f"{where}: not a CurveZMQ key (expected {KEY_CHARS} Z85 characters, as gllm keygen writes)")
    return key


def read_keys(path: str | os.PathLike) -> list[bytes]:
    """Every key in a key file: its non-empty lines that are not ``#`` comments."""
    lines = Path(path).read_text(encoding="ascii", errors="replace").splitlines()
    return [parse_key(line, f"{path}, line {n}") for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_key(path: str | os.PathLike) -> bytes:
    """The one key of a key file."""
    keys = read_keys(path)
    if len(keys) != 1:
        raise ValueError(f"{path}: expected one key, found {len(keys)}")
    return keys[0]


def key_from(source: KeySource) -> bytes:
    """A key given as Z85 text (40 characters) or as the path of a file holding one."""
    if isinstance(source, (str, bytes)) and len(source.strip()) == KEY_CHARS and not os.path.exists(source):
        return parse_key(source, "key")
    return read_key(os.fsdecode(source))


def read_allowed_keys(path: str | os.PathLike) -> frozenset[bytes]:
    """Client public keys from a file of keys, or from every ``*.pub`` file in a folder."""
    path = Path(path)
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
    keys = frozenset(key for f in files for key in read_keys(f))
    if not keys:
        raise ValueError(f"{path}: no public keys found (a folder is searched for *.pub files)")
    return keys


def public_key(secret: bytes) -> bytes:
    return zmq.curve_public(secret)


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to reach a CurveZMQ runtime: the server's public key and its own key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: KeySource | None, secret_key: KeySource | None) -> ClientKeys | None:
        """Keys from Z85 text or key files; None when neither is given (a plain connection)."""
        if server_key is None and secret_key is None:
            return None
        if server_key is None or secret_key is None:
            raise ValueError("CurveZMQ needs both server_key (the runtime's public key) and secret_key (the client's)")
        secret = key_from(secret_key)
        return cls(key_from(server_key), public_key(secret), secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CurveZMQ client; call before it connects."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def write_key_pair(folder: str | os.PathLike, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.pub`` and ``NAME.key`` (mode 0600) in ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pub_path, key_path = folder / f"{name}.pub", folder / f"{name}.key"
    if not force:
        for p in (pub_path, key_path):
            if p.exists():
                raise ValueError(f"{p} exists; pass --force to replace it")
    public, secret = zmq.curve_keypair()
    key_path.unlink(missing_ok=True)  # a fresh file, so the mode below is the one it gets
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"# gllm CurveZMQ secret key: keep it private. Public key: {public.decode()}\n{secret.decode()}\n")
    pub_path.write_text(public.decode() + "\n", encoding="ascii")
    return pub_path, key_path


# ---------------------------------------------------------------------------------------- gllm keygen
def add_keygen_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="make a CurveZMQ key pair (NAME.pub, NAME.key) for gllm serve or a client")
    p.add_argument("name", nargs="?", default="gllm", help="file name without suffix (default gllm)")
    p.add_argument("--out", default=".", metavar="DIR", help="folder to write the files in (default: here)")
    p.add_argument("--force", action="store_true", help="replace existing files of that name")


def keygen(args: argparse.Namespace) -> int:
    pub_path, key_path = write_key_pair(args.out, args.name, args.force)
    print(f"public key: {pub_path} ({read_key(pub_path).decode()})")
    print(f"secret key: {key_path} (mode 0600; keep it private)")
    return 0
