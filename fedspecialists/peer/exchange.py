"""Peer-to-peer expert exchange for FedMoE-DA: expert tensors travel client to client.

Flower has no node-to-node channel (issues #3149, #4273), so experts move through a transport of
our own, behind one small interface (:class:`PeerTransport`):

* ``publish(expert_key, tensors) -> sha256``: the owner makes an expert available to peers and
  reports the content hash to the server (in its reply);
* ``fetch(ref, grant) -> tensors``: a peer reads a named expert. The transport refuses a missing
  or expired server authorisation, a payload over the size limit, and content whose SHA-256 differs
  from the hash the owner reported (:class:`PeerFetchError` with the reason).

Authorisation: every round the server signs (Ed25519) a grant for each node it sends a sync plan
to, naming the round, the node and an expiry time. Owners verify grants with the server's public
key, which the server sends them in their own messages. Nodes can verify grants but not mint them.
An owner's store serves one round, the latest it knows the server has begun: the round of its
own latest instruction, or of a later grant the server signed (an owner left out of a round, or
not yet started on it, learns the round from its first fetch). A grant of another round is
refused, so a grant cannot be replayed in a later round (:func:`authorise`).

:class:`LocalPeerStore` is the simulation transport: each node owns a folder (its *address*);
peers read it directly, so no expert byte goes through the SuperLink. A network transport for
real deployments (a peer endpoint per SuperNode, address from ``--node-config``, TLS, timeout)
implements the same interface.

Experts are stored as safetensors; content-addressed files (``experts/<sha256>.safetensors``) keep
each publication immutable, so a peer reading while its owner re-publishes still gets exactly the
version the server named. The owner keeps its last two publications.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


class PeerFetchError(RuntimeError):
    """A peer expert could not be used (missing, unauthorised, too large, tampered, ...)."""


@dataclass(frozen=True)
class ExpertRef:
    """An expert named in a sync plan: who owns it, where it is and what its content hash is."""

    expert_id: str  # "<owner node id>/<expert index>"
    owner: int
    address: str
    sha256: str


# --------------------------------------------------------------------------------------------
# Expert bytes
# --------------------------------------------------------------------------------------------


def expert_to_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """An expert as safetensors bytes (what is stored, hashed and sent)."""
    # order="C", not np.ascontiguousarray, which turns a 0-d array into (1,)
    return st_save({k: np.asarray(v, order="C") for k, v in sorted(tensors.items())})


def expert_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    return dict(st_load(data))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Per-round authorisation
# --------------------------------------------------------------------------------------------


class GrantIssuer:
    """The server's signing key for peer-fetch grants (one per run)."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None) -> None:
        self._key = private_key or Ed25519PrivateKey.generate()

    def private_key_hex(self) -> str:
        """The raw private key, hex (a checkpoint keeps it so a resumed run signs alike)."""
        return self._key.private_bytes_raw().hex()

    @classmethod
    def from_private_hex(cls, text: str) -> GrantIssuer:
        return cls(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text)))

    @property
    def public_key(self) -> str:
        """Raw public key, hex (sent to every node so owners can verify grants)."""
        return self._key.public_key().public_bytes_raw().hex()

    def issue(self, server_round: int, node_id: int, ttl_s: float, now: float | None = None) -> str:
        """A grant letting ``node_id`` fetch peer experts in ``server_round`` for ``ttl_s``."""
        payload = json.dumps(
            {"round": server_round, "node": node_id, "exp": (now or time.time()) + ttl_s},
            sort_keys=True,
        ).encode()
        signature = self._key.sign(payload)
        return _b64(payload) + "." + _b64(signature)


def verify_grant(
    grant: str | None,
    public_key_hex: str,
    node_id: int | None = None,
    now: float | None = None,
    expected_round: int | None = None,
) -> dict[str, float]:
    """Check a grant's signature and expiry (and, if given, its node and its round).

    Parameters
    ----------
    grant : str | None
        The grant the request carries.
    public_key_hex : str
        The server's public key (raw, hex).
    node_id : int | None
        The requester: the grant must have been issued to it.
    now : float | None
        The time to check expiry against (default: now).
    expected_round : int | None
        The round the verifying store serves: the grant must have been issued for it.

    Returns
    -------
    dict
        The grant's payload (``round``, ``node``, ``exp``).

    Raises
    ------
    PeerFetchError
        No grant, a bad signature, an expired grant, or a grant of another node or round.
    """
    if not grant:
        raise PeerFetchError("no authorisation: the request carries no server grant")
    try:
        payload_b64, signature_b64 = grant.split(".")
        payload, signature = _unb64(payload_b64), _unb64(signature_b64)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(signature, payload)
        claims = json.loads(payload)
    except (ValueError, InvalidSignature) as exc:
        raise PeerFetchError(f"authorisation refused: invalid grant ({exc!r})") from exc
    if float(claims["exp"]) < (now or time.time()):
        raise PeerFetchError(f"authorisation refused: grant expired (round {claims['round']})")
    if node_id is not None and int(claims["node"]) != node_id:
        raise PeerFetchError(f"authorisation refused: grant issued to node {claims['node']}")
    if expected_round is not None and int(claims["round"]) != expected_round:
        raise PeerFetchError(
            f"authorisation refused: grant issued for round {claims['round']}, "
            f"this store serves round {expected_round}"
        )
    return dict(claims)


# The owner's side of a fetch: the trusted key and the round served live in the store folder
# (``grant_key``; ``grant_round`` = {"key", "round"}), written by the owner's ClientApp and read
# by whoever serves the folder (a gRPC endpoint, or in simulation the requester itself).
_ROUND_LOCK = threading.Lock()  # read-and-raise of ``grant_round`` by threads of one process


def serving_round(store: Path, public_key_hex: str) -> int | None:
    """The round ``store`` serves for the server with this key (None: none known yet)."""
    try:
        mark = json.loads((store / "grant_round").read_text())
        return int(mark["round"]) if mark["key"] == public_key_hex else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def advance_round(store: Path, public_key_hex: str, server_round: int) -> None:
    """Have ``store`` serve ``server_round`` unless it already serves a later one of this key."""
    with _ROUND_LOCK:
        current = serving_round(store, public_key_hex)
        if current is None or server_round > current:
            mark = {"key": public_key_hex, "round": int(server_round)}
            _atomic_write(store / "grant_round", json.dumps(mark).encode())


def authorise(store: Path, grant: str | None, requester: int) -> dict[str, float]:
    """The owner's check of a fetch from its store: a grant signed by the trusted server key for
    ``requester`` and for the round the store serves.

    The round served is the latest the store knows the server has begun: that of the owner's
    latest instruction, or of a later grant that passes every check (only the server can sign
    one, so it shows that its round has begun). A grant of an earlier round is refused.

    Returns
    -------
    dict
        The grant's payload.

    Raises
    ------
    PeerFetchError
        As :func:`verify_grant`; the caller checks first that ``grant_key`` exists.
    """
    key = (store / "grant_key").read_text().strip()
    serving = serving_round(store, key)
    expected = _round_to_check(serving, _claimed_round(grant))
    claims = verify_grant(grant, key, node_id=requester, expected_round=expected)
    if expected is not None and expected != serving:  # a verified grant of a later round
        advance_round(store, key, expected)
    return claims


def _round_to_check(serving: int | None, claimed: int | None) -> int | None:
    """The round a grant must name: the one served, or a later one it claims (then verified)."""
    if claimed is None or (serving is not None and claimed <= serving):
        return serving
    return claimed


def _claimed_round(grant: str | None) -> int | None:
    """The round a grant names, unverified (None when it names none)."""
    try:
        return int(json.loads(_unb64(str(grant).split(".")[0]))["round"])
    except (ValueError, KeyError, TypeError):
        return None


def is_sha256_hex(text: str) -> bool:
    """Whether ``text`` is a SHA-256 digest as stores name files: 64 lowercase hex digits."""
    return len(text) == 64 and set(text) <= set("0123456789abcdef")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------------------------


class PeerTransport(Protocol):
    """What FedMoE-DA's client needs from an expert transport."""

    @property
    def address(self) -> str:
        """Where peers reach this node's experts (a folder, or host:port)."""

    @property
    def bytes_fetched(self) -> int:
        """Expert payload bytes read from peers so far."""

    def trust(self, public_key_hex: str, server_round: int | None = None) -> None:
        """Accept grants signed by this server key from now on (the owner side), for
        ``server_round`` (the round of the instruction that brought the key) or later."""

    def publish(
        self, server_round: int, experts: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, str]:
        """Make this node's experts available; return expert key -> SHA-256 of its bytes."""

    def fetch(self, ref: ExpertRef, grant: str | None, requester: int) -> dict[str, np.ndarray]:
        """Read a peer's expert; raise :class:`PeerFetchError` when it cannot be used."""


class LocalPeerStore:
    """Simulation transport: node-local folders that peers read directly (no SuperLink bytes).

    Parameters
    ----------
    address : str
        This node's folder; the server passes it to peers in their sync plans.
    max_bytes : int
        Largest expert payload read from a peer.
    keep_publications : int
        Publications kept (older content-addressed files are deleted).
    """

    def __init__(self, address: str | Path, max_bytes: int, keep_publications: int = 2) -> None:
        self.address = str(address)
        self.max_bytes = int(max_bytes)
        self.keep = keep_publications
        self.bytes_fetched = 0
        (Path(self.address) / "experts").mkdir(parents=True, exist_ok=True)

    # -- owner side --------------------------------------------------------------------------
    def trust(self, public_key_hex: str, server_round: int | None = None) -> None:
        _atomic_write(Path(self.address) / "grant_key", public_key_hex.encode())
        if server_round is not None:
            advance_round(Path(self.address), public_key_hex, server_round)

    def publish(
        self, server_round: int, experts: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, str]:
        folder = Path(self.address)
        hashes = {}
        for key, tensors in experts.items():
            data = expert_to_bytes(tensors)
            digest = sha256(data)
            path = folder / "experts" / f"{digest}.safetensors"
            if not path.exists():
                _atomic_write(path, data)
            hashes[key] = digest
        index_path = folder / "publications.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else []
        index = [*index, {"round": server_round, "hashes": hashes}][-self.keep :]
        _atomic_write(index_path, json.dumps(index).encode())
        live = {h for entry in index for h in entry["hashes"].values()}
        for old in (folder / "experts").glob("*.safetensors"):
            if old.stem not in live:
                old.unlink(missing_ok=True)
        return hashes

    # -- requester side ----------------------------------------------------------------------
    def fetch(self, ref: ExpertRef, grant: str | None, requester: int) -> dict[str, np.ndarray]:
        owner = Path(ref.address)
        key_file = owner / "grant_key"
        if not key_file.exists():
            raise PeerFetchError(f"peer {ref.owner} unreachable: no store at {owner}")
        # The owner's check: a grant signed by the server key the owner trusts, for its round.
        authorise(owner, grant, requester)
        if not is_sha256_hex(ref.sha256):
            raise PeerFetchError(f"expert {ref.expert_id}: not a SHA-256 digest")
        path = owner / "experts" / f"{ref.sha256}.safetensors"
        if not path.exists():
            raise PeerFetchError(f"peer {ref.owner} does not hold expert {ref.expert_id}")
        data = read_at_most(path, self.max_bytes)
        if data is None:
            raise PeerFetchError(
                f"expert {ref.expert_id}: {path.stat().st_size} bytes over the "
                f"{self.max_bytes} limit"
            )
        if sha256(data) != ref.sha256:
            raise PeerFetchError(f"expert {ref.expert_id}: content does not match its owner's hash")
        self.bytes_fetched += len(data)  # only verified bytes count
        try:
            return expert_from_bytes(data)
        except Exception as exc:  # a corrupt payload is the peer's failure, not ours
            raise PeerFetchError(f"expert {ref.expert_id}: unreadable ({exc!r})") from exc


class ChangedOnlyFetch:
    """Any transport, fetching a peer expert only when its content changed since this node's copy.

    Fetched experts are kept under ``<folder>/peer-cache/<sha256>.safetensors``. The stores are
    content-addressed, so a plan naming a hash this node already holds names the same bytes: they
    are read from the cache (re-hashed first: a copy altered on disk is dropped and fetched again)
    and count no peer bytes. :meth:`prune` keeps only what the latest plan used.
    """

    def __init__(self, transport: PeerTransport, folder: str | Path) -> None:
        self.transport = transport
        self.cache = Path(folder) / "peer-cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.reused = 0

    @property
    def address(self) -> str:
        return self.transport.address

    @property
    def bytes_fetched(self) -> int:
        return self.transport.bytes_fetched

    def trust(self, public_key_hex: str, server_round: int | None = None) -> None:
        self.transport.trust(public_key_hex, server_round)

    def publish(
        self, server_round: int, experts: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, str]:
        return self.transport.publish(server_round, experts)

    def fetch(self, ref: ExpertRef, grant: str | None, requester: int) -> dict[str, np.ndarray]:
        path = self.cache / f"{ref.sha256}.safetensors"
        if path.exists():
            data = path.read_bytes()
            if sha256(data) == ref.sha256:
                self.reused += 1
                return expert_from_bytes(data)
            path.unlink(missing_ok=True)  # altered on disk: fetch it again
        tensors = self.transport.fetch(ref, grant, requester)
        data = expert_to_bytes(tensors)
        if sha256(data) == ref.sha256:  # the owner's own serialisation: safe to reuse by hash
            _atomic_write(path, data)
        return tensors

    def prune(self, keep: set[str]) -> None:
        """Delete cached experts whose hash is not in ``keep``."""
        for old in self.cache.glob("*.safetensors"):
            if old.stem not in keep:
                old.unlink(missing_ok=True)


def read_at_most(path: Path, max_bytes: int) -> bytes | None:
    """A file's bytes, or None when it holds more than ``max_bytes`` (never more is read)."""
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    return data if len(data) <= max_bytes else None


def _atomic_write(path: Path, data: bytes) -> None:
    # Unique per process and thread: an endpoint's threads may write the same file at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
