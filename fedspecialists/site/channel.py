"""The local channel between a ClientApp and its site's warm process.

A Unix socket in a folder only its owner can enter (0700; the socket itself 0600), so that no
other host can reach it and no other user of this host can connect. Each connection is then
checked twice by the site before it reads a byte of the request:

* the peer's user id, from the kernel (``SO_PEERCRED``, Linux), must be the site's own;
* the peer must prove it holds the site's secret (32 random bytes in a 0600 file): the site
  sends a fresh nonce, the peer answers ``HMAC-SHA256(secret, nonce)``.

Frames are a 4-byte big-endian length and that many bytes; one request and one response per
connection. A refused peer gets ``refused: <reason>`` and the connection is closed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

NONCE_BYTES = 32
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes on Linux, the terminating NUL included
MAX_FRAME_BYTES = 1 << 30  # a message (adapters, experts) is far smaller; a bound all the same
_LENGTH = struct.Struct(">I")
_OK = b"ok"


class ChannelRefusedError(ConnectionError):
    """The site refused this peer (wrong user or secret); the reason is the message."""


# -- the secret -----------------------------------------------------------------------------------
def write_secret(path: Path) -> bytes:
    """A new random secret in ``path``, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret.hex().encode())
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that existed
    return secret


def read_secret(path: Path) -> bytes:
    """The secret in ``path``; refused if other users could read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by other users (mode {oct(mode & 0o777)})")
    return bytes.fromhex(path.read_text().strip())


def proof(secret: bytes, nonce: bytes) -> bytes:
    """What a peer holding ``secret`` answers to ``nonce``: ``HMAC-SHA256(secret, nonce)``."""
    return hmac.new(secret, nonce, hashlib.sha256).digest()


# -- frames ---------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME_BYTES) -> bytes:
    """One frame; ``ConnectionError`` if the peer closes early or announces more than ``limit``."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > limit:
        raise ConnectionError(f"frame of {length} bytes announced, limit {limit}")
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def pack(parts: Sequence[bytes]) -> bytes:
    """Several byte strings as one (each length-prefixed)."""
    return b"".join(_LENGTH.pack(len(p)) + p for p in parts)


def unpack(data: bytes) -> list[bytes]:
    """The inverse of :func:`pack`; ``ValueError`` on a malformed buffer."""
    parts, at = [], 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise ValueError("truncated part length")
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + length > len(data):
            raise ValueError("truncated part")
        parts.append(data[at : at + length])
        at += length
    return parts


# -- the site's side ------------------------------------------------------------------------------
def listen(path: Path) -> socket.socket:
    """A listening socket at ``path``, in a folder only this user can enter."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes (AF_UNIX)")
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    elif folder.stat().st_mode & 0o077:  # never loosen or tighten a folder someone else uses
        raise PermissionError(f"{folder} must be its owner's only (chmod 700) to hold the socket")
    path.unlink(missing_ok=True)  # a socket left by a site that died
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    return server


def peer_uid(conn: socket.socket) -> int | None:
    """The connected peer's user id from the kernel (Linux), else ``None``."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def admit(conn: socket.socket, secret: bytes, uid: int | None = None) -> str | None:
    """Check a new connection: ``None`` if admitted, else why it was refused (already told it).

    ``uid`` is the user the peer must be (default: this process's).
    """
    expected = os.getuid() if uid is None else uid
    nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(conn, nonce)
    answer = recv_frame(conn, limit=64)
    seen = peer_uid(conn)
    reason = None
    if seen is not None and seen != expected:
        reason = f"peer user {seen} is not the site's user {expected}"
    elif not hmac.compare_digest(answer, proof(secret, nonce)):
        reason = "wrong secret"
    send_frame(conn, _OK if reason is None else f"refused: {reason}".encode())
    return reason


def serve_one(
    server: socket.socket, secret: bytes, handle: Callable[[bytes], bytes], timeout: float = 30
) -> str | None:
    """Accept one connection, admit it, answer its request with ``handle``; the refusal reason
    (or ``None``). ``timeout`` bounds the handshake and the request's arrival, not ``handle``."""
    conn, _ = server.accept()
    with conn:
        conn.settimeout(timeout)
        try:
            reason = admit(conn, secret)
            if reason is not None:
                return reason
            request = recv_frame(conn)
        except (ConnectionError, TimeoutError, OSError) as exc:
            return f"connection lost: {exc}"
        conn.settimeout(None)
        response = handle(request)
        try:
            send_frame(conn, response)
        except OSError as exc:  # the ClientApp gave up waiting: its message has failed
            return f"reply not delivered: {exc}"
    return None


# -- the ClientApp's side -------------------------------------------------------------------------
def call(path: Path, secret: bytes, request: bytes, timeout: float | None = None) -> bytes:
    """Send ``request`` to the site at ``path`` and return its response.

    ``FileNotFoundError`` / ``ConnectionRefusedError`` when no site listens there (the caller
    may then do the work itself); :class:`ChannelRefusedError` when the site refuses this peer;
    ``ConnectionError`` when the site dies before answering.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        nonce = recv_frame(sock, limit=NONCE_BYTES)
        send_frame(sock, proof(secret, nonce))
        verdict = recv_frame(sock, limit=1024)
        if verdict != _OK:
            raise ChannelRefusedError(verdict.decode(errors="replace"))
        send_frame(sock, request)
        return recv_frame(sock)
