"""The network peer transport: a gRPC expert endpoint with TLS, grants, limits and hash checks."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture()
def plain_endpoints(tmp_path: Path) -> Iterator[list[PeerEndpoint]]:
    """Endpoints a test starts (``_serve``), each stopped at the end of the test."""
    started: list[PeerEndpoint] = []
    try:
        yield started
    finally:
        for endpoint in started:
            endpoint.stop()


def _serve(started: list[PeerEndpoint], store: Path, **kwargs: Any) -> PeerEndpoint:
    endpoint = PeerEndpoint(store, "127.0.0.1:0", **kwargs)
    started.append(endpoint)  # stopped by the fixture even if start() fails
    return endpoint.start()


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


# --------------------------------------------------------------------------------------------
# Round of a grant, bytes counted only when verified
# --------------------------------------------------------------------------------------------


def test_endpoint_refuses_a_grant_replayed_in_a_later_round(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, owner, ca, issuer = site
    ref = ExpertRef("1/0", 1, owner.address, owner.publish(1, {"0": EXPERT})["0"])
    peer = _requester(tmp_path, ca)
    peer.fetch(ref, issuer.issue(2, 2, 60), 2)
    peer.fetch(ref, issuer.issue(3, 2, 60), 2)  # round 3 has begun
    with pytest.raises(PeerFetchError, match=r"PERMISSION_DENIED.*issued for round 2\b.*round 3\b"):
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)  # round 2's grant, still unexpired
    assert len(endpoint.refused) == 1


def test_endpoint_serves_the_round_its_owner_was_sent(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, owner, ca, issuer = site
    ref = ExpertRef("1/0", 1, owner.address, owner.publish(2, {"0": EXPERT})["0"])
    owner.trust(issuer.public_key, server_round=3)  # the owner's round-3 instruction
    peer = _requester(tmp_path, ca)
    with pytest.raises(PeerFetchError, match=r"issued for round 2\b.*round 3\b"):
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)
    peer.fetch(ref, issuer.issue(3, 2, 60), 2)
    # Round 4 was not sent to this owner (not sampled), but a server-signed round-4 grant
    # shows that it has begun: from then on round 3's grants are replays.
    peer.fetch(ref, issuer.issue(4, 2, 60), 2)
    with pytest.raises(PeerFetchError, match=r"issued for round 3\b.*round 4\b"):
        peer.fetch(ref, issuer.issue(3, 2, 60), 2)
    assert len(endpoint.refused) == 2


def test_tampered_bytes_are_not_counted_by_the_fetcher(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, owner, ca, issuer = site
    digest = owner.publish(1, {"0": EXPERT})["0"]
    path = tmp_path / "site1" / "experts" / f"{digest}.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-1] + b"\x7f")
    peer = _requester(tmp_path, ca)
    with pytest.raises(PeerFetchError, match="does not match"):
        peer.fetch(ExpertRef("1/0", 1, owner.address, digest), issuer.issue(2, 2, 60), 2)
    assert (peer.bytes_fetched, endpoint.served_bytes) == (0, size)  # sent, but not counted


# --------------------------------------------------------------------------------------------
# The endpoint's own refusals
# --------------------------------------------------------------------------------------------


def test_malformed_or_path_like_digests_stay_inside_the_store(
    site,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, owner, ca, issuer = site
    owner.publish(1, {"0": EXPERT})
    store = os.path.realpath(tmp_path / "site1")
    # A file outside the store that ``experts/../../secret.safetensors`` would reach.
    (tmp_path / "secret.safetensors").write_bytes(b"outside the store")
    peer = _requester(tmp_path, ca)
    touched: list[str] = []
    for name in ("exists", "stat", "open", "read_bytes", "read_text"):
        original = getattr(Path, name)

        def spy(self: Path, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            touched.append(os.path.realpath(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Path, name, spy)
    digests = ("../../secret", "../../etc/passwd", "abc", "g" * 64, "../" * 21 + "a", "")
    for digest in digests:
        with pytest.raises(PeerFetchError, match="INVALID_ARGUMENT: not a SHA-256 digest"):
            peer.fetch(ExpertRef("1/0", 1, owner.address, digest), issuer.issue(2, 2, 60), 2)
    monkeypatch.undo()
    assert touched and all(p.startswith(store + os.sep) for p in touched)
    assert len(endpoint.refused) == len(digests) and endpoint.served_bytes == 0


def test_the_endpoints_own_size_limit_refuses(plain_endpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    issuer = GrantIssuer()
    owner = GrpcPeerTransport(tmp_path / "site1", "unused", None)
    owner.trust(issuer.public_key)
    digest = owner.publish(1, {"0": EXPERT})["0"]
    size = (tmp_path / "site1" / "experts" / f"{digest}.safetensors").stat().st_size
    # The endpoint allows one byte less than the expert; the fetcher allows 16 MB.
    endpoint = _serve(plain_endpoints, tmp_path / "site1", max_bytes=size - 1)
    peer = _requester(tmp_path, None)
    ref = ExpertRef("1/0", 1, f"127.0.0.1:{endpoint.port}", digest)
    with pytest.raises(PeerFetchError, match=rf"RESOURCE_EXHAUSTED: expert over {size - 1} bytes"):
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)
    assert endpoint.refused == [f"expert over {size - 1} bytes"] and endpoint.served_bytes == 0
    at_limit = _serve(plain_endpoints, tmp_path / "site1", max_bytes=size)
    ref = ExpertRef("1/0", 1, f"127.0.0.1:{at_limit.port}", digest)
    assert np.array_equal(
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)["fc1.weight"], EXPERT["fc1.weight"]
    )
    assert at_limit.served_bytes == size


def test_a_request_before_the_server_key_is_known_is_refused(
    plain_endpoints, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    issuer = GrantIssuer()
    owner = GrpcPeerTransport(tmp_path / "site1", "unused", None)
    digest = owner.publish(1, {"0": EXPERT})["0"]  # published, but no instruction seen yet
    endpoint = _serve(plain_endpoints, tmp_path / "site1")
    peer = _requester(tmp_path, None)
    ref = ExpertRef("1/0", 1, f"127.0.0.1:{endpoint.port}", digest)
    with pytest.raises(PeerFetchError, match="UNAVAILABLE: this site has not joined a round yet"):
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)
    assert len(endpoint.refused) == 1 and endpoint.served_bytes == 0
    owner.trust(issuer.public_key)  # the key arrives: the same request is now served
    assert np.array_equal(
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)["fc1.weight"], EXPERT["fc1.weight"]
    )


@pytest.mark.parametrize("wrong", ["another CA", "another host name"])
def test_tls_refuses_a_certificate_of_another_ca_or_host(  # type: ignore[no-untyped-def]
    plain_endpoints, site, tmp_path: Path, wrong: str
) -> None:
    good, owner, ca, issuer = site  # ``ca``: the CA the fetcher trusts
    if wrong == "another CA":
        other_ca, other_key = make_ca(tmp_path / "other-pki")
        cert, key = make_server_cert(
            tmp_path / "other-pki", "peer1", ["127.0.0.1", "localhost"], other_ca, other_key
        )
    else:
        cert, key = make_server_cert(
            tmp_path / "pki", "elsewhere", ["peer.example.org"], ca, tmp_path / "pki" / "ca.key"
        )
    digest = owner.publish(1, {"0": EXPERT})["0"]
    endpoint = _serve(plain_endpoints, tmp_path / "site1", certfile=cert, keyfile=key)
    ref = ExpertRef("1/0", 1, f"127.0.0.1:{endpoint.port}", digest)
    peer = _requester(tmp_path, ca, timeout_s=5)
    with pytest.raises(PeerFetchError, match="UNAVAILABLE"):
        peer.fetch(ref, issuer.issue(2, 2, 60), 2)
    # Refused by the handshake: the request never reached the endpoint's handler.
    assert endpoint.refused == [] and endpoint.served_bytes == 0
    # The same fetcher, grant and store, through the site's rightful certificate: served.
    peer.fetch(ExpertRef("1/0", 1, f"127.0.0.1:{good.port}", digest), issuer.issue(2, 2, 60), 2)
    assert (
        good.served_bytes
        == (tmp_path / "site1" / "experts" / f"{digest}.safetensors").stat().st_size
    )
