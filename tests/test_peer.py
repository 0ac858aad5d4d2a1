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


# --------------------------------------------------------------------------------------------
# Round of a grant, bytes counted only when verified, digests that are not digests
# --------------------------------------------------------------------------------------------


def test_verify_grant_refuses_a_grant_of_another_round() -> None:
    issuer = GrantIssuer()
    grant = issuer.issue(3, node_id=7, ttl_s=60, now=1000.0)
    claims = verify_grant(grant, issuer.public_key, node_id=7, now=1030.0, expected_round=3)
    assert claims["round"] == 3
    for other in (2, 4):  # an earlier and a later round: both named in the refusal
        with pytest.raises(PeerFetchError, match=rf"issued for round 3\b.*round {other}\b"):
            verify_grant(grant, issuer.public_key, node_id=7, now=1030.0, expected_round=other)


def test_a_grant_replayed_in_a_later_round_is_refused(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    digest = owner.publish(1, {"0": EXPERT})["0"]
    ref = ExpertRef("1/0", 1, owner.address, digest)
    size = (Path(owner.address) / "experts" / f"{digest}.safetensors").stat().st_size
    requester.fetch(ref, issuer.issue(2, 2, 60), 2)
    requester.fetch(ref, issuer.issue(3, 2, 60), 2)  # round 3 has begun
    with pytest.raises(PeerFetchError, match=r"issued for round 2\b.*round 3\b"):
        requester.fetch(ref, issuer.issue(2, 2, 60), 2)  # round 2's grant, still unexpired
    assert requester.bytes_fetched == 2 * size


def test_the_owner_serves_the_round_of_its_instruction(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    digest = owner.publish(4, {"0": EXPERT})["0"]
    ref = ExpertRef("1/0", 1, owner.address, digest)
    owner.trust(issuer.public_key, server_round=5)  # the owner's round-5 instruction
    with pytest.raises(PeerFetchError, match=r"issued for round 4\b.*round 5\b"):
        requester.fetch(ref, issuer.issue(4, 2, 60), 2)
    requester.fetch(ref, issuer.issue(5, 2, 60), 2)
    # A late instruction of an earlier round does not move the owner back.
    owner.trust(issuer.public_key, server_round=4)
    with pytest.raises(PeerFetchError, match=r"issued for round 4\b.*round 5\b"):
        requester.fetch(ref, issuer.issue(4, 2, 60), 2)
    # Refused grants of a later round (expired, another server's) do not move it forward.
    with pytest.raises(PeerFetchError, match="expired"):
        requester.fetch(ref, issuer.issue(9, 2, ttl_s=-1), 2)
    with pytest.raises(PeerFetchError, match="invalid grant"):
        requester.fetch(ref, GrantIssuer().issue(9, 2, 60), 2)
    requester.fetch(ref, issuer.issue(5, 2, 60), 2)
    # A new run (another server key) starts again from its own round 1.
    second = GrantIssuer()
    owner.trust(second.public_key, server_round=1)
    requester.fetch(ref, second.issue(1, 2, 60), 2)
    with pytest.raises(PeerFetchError, match="invalid grant"):
        requester.fetch(ref, issuer.issue(5, 2, 60), 2)  # the first run's key: no longer trusted


def test_tampered_expert_bytes_are_not_counted(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    digest = owner.publish(1, {"0": EXPERT})["0"]
    path = Path(owner.address) / "experts" / f"{digest}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PeerFetchError, match="does not match"):
        requester.fetch(ExpertRef("1/0", 1, owner.address, digest), issuer.issue(2, 2, 60), 2)
    assert requester.bytes_fetched == 0
    other = {"w": np.zeros(3, np.float32)}
    valid = owner.publish(2, {"0": other})["0"]
    requester.fetch(ExpertRef("1/0", 1, owner.address, valid), issuer.issue(2, 2, 60), 2)
    stored = Path(owner.address) / "experts" / f"{valid}.safetensors"
    # The valid expert's bytes alone: its 3 float32 values (12 bytes) and the safetensors header.
    assert requester.bytes_fetched == stored.stat().st_size > 12


def test_a_path_like_digest_is_refused_by_the_local_store(tmp_path: Path) -> None:
    owner, requester, issuer = _pair(tmp_path)
    owner.publish(1, {"0": EXPERT})
    # A readable file outside the owner's store that a traversal would reach.
    (tmp_path / "secret.safetensors").write_bytes((tmp_path / "node-1" / "grant_key").read_bytes())
    for digest in ("../../secret", "abc", "g" * 64, "../" * 21 + "a"):
        with pytest.raises(PeerFetchError, match="not a SHA-256 digest"):
            requester.fetch(ExpertRef("1/0", 1, owner.address, digest), issuer.issue(2, 2, 60), 2)
    assert requester.bytes_fetched == 0
