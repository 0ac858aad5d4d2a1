"""The simulation peer transport and the server's per-round fetch grants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedspecialists.peer.exchange import (
    ChangedOnlyFetch,
    ExpertRef,
    GrantIssuer,
    LocalPeerStore,
    PeerFetchError,
    expert_to_bytes,
    sha256,
    verify_grant,
)

EXPERT = {
    "fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "fc1.bias": np.ones(2, np.float32),
}


def _pair(tmp_path: Path) -> tuple[LocalPeerStore, LocalPeerStore, GrantIssuer]:
    issuer = GrantIssuer()
    owner = LocalPeerStore(tmp_path / "node-1", max_bytes=10_000)
    requester = LocalPeerStore(tmp_path / "node-2", max_bytes=10_000)
    owner.trust(issuer.public_key)
    return owner, requester, issuer


def test_grants_verify_and_expire() -> None:
    issuer = GrantIssuer()
    grant = issuer.issue(3, node_id=7, ttl_s=60, now=1000.0)
    claims = verify_grant(grant, issuer.public_key, node_id=7, now=1030.0)
    assert claims["round"] == 3 and claims["node"] == 7
    with pytest.raises(PeerFetchError, match="expired"):
        verify_grant(grant, issuer.public_key, node_id=7, now=1061.0)
    with pytest.raises(PeerFetchError, match="node 7"):
        verify_grant(grant, issuer.public_key, node_id=8, now=1030.0)
    with pytest.raises(PeerFetchError, match="invalid grant"):
        verify_grant(grant, GrantIssuer().public_key, node_id=7, now=1030.0)  # another server
    with pytest.raises(PeerFetchError, match="no authorisation"):
        verify_grant(None, issuer.public_key)


def test_publish_then_fetch_counts_peer_bytes(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    hashes = owner.publish(1, {"0": EXPERT})
    assert hashes["0"] == sha256(expert_to_bytes(EXPERT))
    ref = ExpertRef("1/0", 1, owner.address, hashes["0"])
    got = requester.fetch(ref, issuer.issue(2, 2, 60), requester=2)
    assert all(np.array_equal(got[k], EXPERT[k]) for k in EXPERT)
    assert requester.bytes_fetched == len(expert_to_bytes(EXPERT)) > 0


def test_tampered_expert_is_refused(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    digest = owner.publish(1, {"0": EXPERT})["0"]
    path = Path(owner.address) / "experts" / f"{digest}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(PeerFetchError, match="does not match"):
        requester.fetch(ExpertRef("1/0", 1, owner.address, digest), issuer.issue(2, 2, 60), 2)


def test_unauthorised_missing_and_oversized_fetches_are_refused(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    digest = owner.publish(1, {"0": EXPERT})["0"]
    ref = ExpertRef("1/0", 1, owner.address, digest)
    with pytest.raises(PeerFetchError, match="no authorisation"):
        requester.fetch(ref, None, 2)
    with pytest.raises(PeerFetchError, match="expired"):
        requester.fetch(ref, issuer.issue(2, 2, ttl_s=-1), 2)
    with pytest.raises(PeerFetchError, match="issued to node 2"):
        requester.fetch(ref, issuer.issue(2, 2, 60), requester=3)  # someone else's grant
    gone = ExpertRef("9/0", 9, str(tmp_path / "node-9"), digest)
    with pytest.raises(PeerFetchError, match="unreachable"):
        requester.fetch(gone, issuer.issue(2, 2, 60), 2)
    stale = ExpertRef("1/0", 1, owner.address, "0" * 64)
    with pytest.raises(PeerFetchError, match="does not hold"):
        requester.fetch(stale, issuer.issue(2, 2, 60), 2)
    small = LocalPeerStore(tmp_path / "node-3", max_bytes=10)
    with pytest.raises(PeerFetchError, match="over the 10 limit"):
        small.fetch(ref, issuer.issue(2, 3, 60), 3)
    assert requester.bytes_fetched == 0


def test_owner_keeps_its_last_two_publications(tmp_path: Path) -> None:
    owner, _, _ = _pair(tmp_path)
    digests = [
        owner.publish(r, {"0": {"w": np.full(2, float(r), np.float32)}})["0"] for r in (1, 2, 3)
    ]
    kept = {p.stem for p in (Path(owner.address) / "experts").glob("*.safetensors")}
    assert kept == set(digests[1:])


def test_changed_only_fetch_reuses_unchanged_experts(tmp_path: Path) -> None:
    owner, plain, issuer = _pair(tmp_path)
    requester = ChangedOnlyFetch(plain, tmp_path / "node-2" / "run-1")
    size = len(expert_to_bytes(EXPERT))
    first = owner.publish(1, {"0": EXPERT})["0"]
    ref = ExpertRef("1/0", 1, owner.address, first)
    requester.fetch(ref, issuer.issue(2, 2, 60), 2)
    again = requester.fetch(ref, issuer.issue(3, 2, 60), 2)  # same hash: read from the cache
    assert all(np.array_equal(again[k], EXPERT[k]) for k in EXPERT)
    assert (requester.bytes_fetched, requester.reused) == (size, 1)
    changed = {k: v + 1 for k, v in EXPERT.items()}
    second = owner.publish(2, {"0": changed})["0"]
    got = requester.fetch(ExpertRef("1/0", 1, owner.address, second), issuer.issue(3, 2, 60), 2)
    assert np.array_equal(got["fc1.bias"], changed["fc1.bias"])
    assert (requester.bytes_fetched, requester.reused) == (2 * size, 1)
    requester.prune({second})
    assert sorted(p.stem for p in requester.cache.glob("*.safetensors")) == [second]


def test_changed_only_fetch_refuses_tampering_in_the_cache_and_at_the_peer(
    tmp_path: Path,
) -> None:
    owner, plain, issuer = _pair(tmp_path)
    requester = ChangedOnlyFetch(plain, tmp_path / "node-2" / "run-1")
    digest = owner.publish(1, {"0": EXPERT})["0"]
    ref = ExpertRef("1/0", 1, owner.address, digest)
    requester.fetch(ref, issuer.issue(2, 2, 60), 2)
    cached = requester.cache / f"{digest}.safetensors"
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")  # altered copy: dropped, fetched again
    requester.fetch(ref, issuer.issue(3, 2, 60), 2)
    assert requester.reused == 0 and plain.bytes_fetched == 2 * len(expert_to_bytes(EXPERT))
    cached.unlink()
    stored = Path(owner.address) / "experts" / f"{digest}.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x01")  # tampered at the owner: refused
    with pytest.raises(PeerFetchError, match="does not match"):
        requester.fetch(ref, issuer.issue(4, 2, 60), 2)
    assert not cached.exists()
