"""The network peer transport: a gRPC expert endpoint with TLS, grants, limits and hash checks."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedspecialists.deploy.certs import make_ca, make_server_cert
from fedspecialists.peer.exchange import ExpertRef, GrantIssuer, PeerFetchError, expert_to_bytes
from fedspecialists.peer.grpc_endpoint import GrpcPeerTransport, PeerEndpoint

EXPERT = {"fc1.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[tuple[PeerEndpoint, GrpcPeerTransport, Path, GrantIssuer]]:
    """Site 1: a TLS endpoint over its store, with one published expert."""
    ca, ca_key = make_ca(tmp_path / "pki")
    cert, key = make_server_cert(tmp_path / "pki", "peer1", ["127.0.0.1", "localhost"], ca, ca_key)
    issuer = GrantIssuer()
    endpoint = PeerEndpoint(tmp_path / "site1", "127.0.0.1:0", cert, key).start()
    owner = GrpcPeerTransport(tmp_path / "site1", f"127.0.0.1:{endpoint.port}", ca)
    owner.trust(issuer.public_key)
    try:
        yield endpoint, owner, ca, issuer
    finally:
        endpoint.stop()


def _requester(tmp_path: Path, ca: Path | None, **kwargs: float) -> GrpcPeerTransport:
    return GrpcPeerTransport(tmp_path / "site2", "127.0.0.1:1", ca, **kwargs)  # type: ignore[arg-type]


def test_fetch_over_tls_with_a_grant(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, owner, ca, issuer = site
    digest = owner.publish(1, {"0": EXPERT})["0"]
    peer = _requester(tmp_path, ca)
    ref = ExpertRef("1/0", 1, owner.address, digest)
    got = peer.fetch(ref, issuer.issue(2, 2, 60), requester=2)
    assert np.array_equal(got["fc1.weight"], EXPERT["fc1.weight"])
    assert peer.bytes_fetched == endpoint.served_bytes == len(expert_to_bytes(EXPERT))


def test_no_expired_or_foreign_grant_is_refused(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, owner, ca, issuer = site
    ref = ExpertRef("1/0", 1, owner.address, owner.publish(1, {"0": EXPERT})["0"])
    peer = _requester(tmp_path, ca)
    for grant, requester, reason in (
        (None, 2, "no authorisation"),
        (issuer.issue(2, 2, ttl_s=-5), 2, "expired"),
        (issuer.issue(2, 3, 60), 2, "issued to node 3"),
        (GrantIssuer().issue(2, 2, 60), 2, "invalid grant"),
    ):
        with pytest.raises(PeerFetchError, match="PERMISSION_DENIED") as info:
            peer.fetch(ref, grant, requester)
        assert reason in str(info.value)
    assert peer.bytes_fetched == 0 and len(endpoint.refused) == 4


def test_tampered_expert_is_detected_by_the_fetcher(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, owner, ca, issuer = site
    digest = owner.publish(1, {"0": EXPERT})["0"]
    path = tmp_path / "site1" / "experts" / f"{digest}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(PeerFetchError, match="does not match"):
        _requester(tmp_path, ca).fetch(
            ExpertRef("1/0", 1, owner.address, digest), issuer.issue(2, 2, 60), 2
        )


def test_size_limit_plaintext_client_and_unreachable_peer(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, owner, ca, issuer = site
    ref = ExpertRef("1/0", 1, owner.address, owner.publish(1, {"0": EXPERT})["0"])
    grant = issuer.issue(2, 2, 60)
    with pytest.raises(PeerFetchError, match="RESOURCE_EXHAUSTED"):
        _requester(tmp_path, ca, max_bytes=16).fetch(ref, grant, 2)
    with pytest.raises(PeerFetchError, match="UNAVAILABLE"):
        _requester(tmp_path, None, timeout_s=3).fetch(ref, grant, 2)  # no TLS against TLS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(PeerFetchError, match="unreachable"):
        _requester(tmp_path, ca, timeout_s=2).fetch(
            ExpertRef("9/0", 9, closed, ref.sha256), grant, 2
        )
