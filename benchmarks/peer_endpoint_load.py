"""Load on a gRPC peer endpoint, on loopback: concurrent fetches, oversized requests, slow clients.

One ``fedspecialists-peer`` endpoint (its own process, plaintext, 127.0.0.1 only) serves a store of
``--experts`` experts of ``--expert-kb`` KiB each, plus one expert over its size limit. Fetchers are
threads of this process, each a :class:`~fedspecialists.peer.grpc_endpoint.GrpcPeerTransport`
(a new channel per fetch, as a ClientApp fetches). Phases, each bounded in requests and all of
them by ``--time-limit`` seconds:

* ``fetch xC``: C concurrent clients, each fetching ``--fetches`` experts (C in ``--clients``);
* ``oversized expert``: C clients ask for the expert over the endpoint's limit (the endpoint
  refuses it; the clients' own limit would allow it);
* ``oversized request``: C requests of 5 MiB, over gRPC's 4 MiB default receive limit;
* ``refused``: no grant, another server's grant, a replayed grant of an earlier round, path-like
  and malformed digests, a missing expert;
* ``slow clients``: ``--slow`` raw TCP connections trickling the HTTP/2 preface a byte at a time
  while 8 clients fetch.

Then the store is compared with its state before the load (every file's SHA-256) and every expert
is fetched once more: refused requests must lose nothing. The table gives per phase the requests
served and refused, throughput, latency p50/p95 and the endpoint process's peak RSS so far
(``VmHWM`` of ``/proc/<pid>/status``). Fetchers and endpoint share this machine's cores, so the
numbers bound the endpoint's capacity from below.

Usage::

    python benchmarks/peer_endpoint_load.py --clients 8 32 64 --fetches 4 --time-limit 90
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from fedspecialists.peer.exchange import ExpertRef, GrantIssuer, LocalPeerStore, PeerFetchError
from fedspecialists.peer.grpc_endpoint import FETCH, GrpcPeerTransport

ROOT = Path(__file__).resolve().parents[1]
ROUND = 2  # the round the endpoint serves: its owner's latest instruction
REQUESTER = 2


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    clients: int
    ok: int = 0
    refused: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    reasons: set[str] = field(default_factory=set)
    peak_rss_mib: float | None = None


@dataclass(frozen=True)
class Site:
    """The endpoint under load and what it serves."""

    address: str
    pid: int
    issuer: GrantIssuer
    digests: list[str]
    oversized: str
    client_dir: Path


# --------------------------------------------------------------------------------------------
# Store and endpoint
# --------------------------------------------------------------------------------------------


def make_store(folder: Path, experts: int, kib: int) -> tuple[GrantIssuer, list[str], str]:
    """Publish ``experts`` experts of ``kib`` KiB and one of ``4 * kib`` KiB (the oversized one).

    Returns
    -------
    tuple
        The server's grant issuer, the experts' digests and the oversized expert's digest.
    """
    rng = np.random.default_rng(0)
    store = LocalPeerStore(folder, max_bytes=1 << 30)
    issuer = GrantIssuer()
    store.trust(issuer.public_key, server_round=ROUND)
    tensors = {
        str(i): {"w": rng.standard_normal(kib * 256, dtype=np.float32)} for i in range(experts)
    }
    tensors["big"] = {"w": rng.standard_normal(kib * 1024, dtype=np.float32)}
    hashes = store.publish(ROUND - 1, tensors)
    return issuer, [hashes[str(i)] for i in range(experts)], hashes["big"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def endpoint_process(store: Path, max_bytes: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``fedspecialists-peer`` on 127.0.0.1, stopped (by its PID) when the block ends."""
    address = f"127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "fedspecialists.peer.grpc_endpoint", "--store", str(store)]
    command += ["--host", "127.0.0.1", "--port", address.split(":")[1]]
    command += ["--max-bytes", str(max_bytes)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield proc, address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident set (``VmHWM``), MiB; None where /proc is not readable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def store_snapshot(store: Path) -> dict[str, str]:
    """Every file of the store (relative path) and its SHA-256."""
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


def _fetch_once(
    transport: GrpcPeerTransport, site: Site, digest: str, grant: str | None, phase: Phase
) -> None:
    ref = ExpertRef("1/0", 1, site.address, digest)
    started = time.perf_counter()
    try:
        transport.fetch(ref, grant, REQUESTER)
    except PeerFetchError as exc:
        phase.refused += 1
        phase.reasons.add(_reason(str(exc)))
    else:
        phase.ok += 1
    phase.latencies_s.append(time.perf_counter() - started)


def _reason(message: str) -> str:
    """The gRPC status code in a refusal (or the refusal's first words)."""
    for code in grpc.StatusCode:
        if f"{code.name}:" in message:
            return code.name
    return " ".join(message.split()[:4])


def run_clients(
    site: Site,
    phase: Phase,
    requests: Callable[[int], list[tuple[str, str | None]]],
    deadline: float,
    max_bytes: int = 1 << 30,
) -> Phase:
    """``phase.clients`` concurrent clients, client ``i`` sending ``requests(i)`` in turn
    (digest, grant), all starting together; no request starts after ``deadline``."""
    barrier = threading.Barrier(phase.clients)
    lock = threading.Lock()

    def client(i: int) -> None:
        transport = GrpcPeerTransport(site.client_dir, "unused", None, max_bytes, timeout_s=10)
        own = Phase(phase.name, 1)
        barrier.wait(timeout=30)
        for digest, grant in requests(i):
            if time.monotonic() > deadline:
                break
            _fetch_once(transport, site, digest, grant, own)
        with lock:
            _merge(phase, own, transport.bytes_fetched)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=phase.clients) as pool:
        for future in [pool.submit(client, i) for i in range(phase.clients)]:
            future.result()
    phase.wall_s = time.perf_counter() - started
    phase.peak_rss_mib = peak_rss_mib(site.pid)
    return phase


def _merge(total: Phase, part: Phase, fetched_bytes: int) -> None:
    total.ok += part.ok
    total.refused += part.refused
    total.bytes += fetched_bytes
    total.latencies_s += part.latencies_s
    total.reasons |= part.reasons


def fetch_phase(site: Site, clients: int, fetches: int, deadline: float) -> Phase:
    """``clients`` clients each fetching ``fetches`` experts with a valid grant."""
    n = len(site.digests)

    def requests(i: int) -> list[tuple[str, str | None]]:
        grant = site.issuer.issue(ROUND, REQUESTER, 600)
        return [(site.digests[(i + j) % n], grant) for j in range(fetches)]

    return run_clients(site, Phase(f"fetch x{clients}", clients), requests, deadline)


def oversized_expert_phase(site: Site, clients: int, deadline: float) -> Phase:
    """Clients asking for the expert over the endpoint's limit (their own limit allows it)."""

    def requests(_: int) -> list[tuple[str, str | None]]:
        return [(site.oversized, site.issuer.issue(ROUND, REQUESTER, 600))]

    return run_clients(site, Phase("oversized expert", clients), requests, deadline)


def refused_phase(site: Site, deadline: float) -> Phase:
    """Requests the endpoint must refuse, one client per kind."""
    good = site.digests[0]
    kinds: list[tuple[str, str | None]] = [
        (good, None),
        (good, GrantIssuer().issue(ROUND, REQUESTER, 600)),  # another server
        (good, site.issuer.issue(ROUND - 1, REQUESTER, 600)),  # replayed: an earlier round
        (good, site.issuer.issue(ROUND, REQUESTER + 1, 600)),  # another node's grant
        ("../../etc/passwd", site.issuer.issue(ROUND, REQUESTER, 600)),
        ("../" * 21 + "a", site.issuer.issue(ROUND, REQUESTER, 600)),
        ("g" * 64, site.issuer.issue(ROUND, REQUESTER, 600)),
        ("0" * 64, site.issuer.issue(ROUND, REQUESTER, 600)),  # no such expert
    ]
    phase = Phase("refused (grants, digests)", len(kinds))
    return run_clients(site, phase, lambda i: [kinds[i]], deadline)


def oversized_request_phase(site: Site, clients: int, deadline: float) -> Phase:
    """Requests of 5 MiB, over the 4 MiB gRPC accepts by default."""
    phase = Phase("oversized request (5 MiB)", clients)
    body = json.dumps({"sha256": site.digests[0], "pad": "x" * (5 << 20)}).encode()

    def client(_: int) -> Phase:
        own = Phase(phase.name, 1)
        if time.monotonic() > deadline:
            return own
        started = time.perf_counter()
        with grpc.insecure_channel(site.address) as channel:
            call = channel.unary_unary(FETCH)
            try:
                call(body, timeout=10)
                own.ok += 1
            except grpc.RpcError as exc:
                own.refused += 1
                own.reasons.add(exc.code().name if hasattr(exc, "code") else "error")
        own.latencies_s.append(time.perf_counter() - started)
        return own

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for part in pool.map(client, range(clients)):
            _merge(phase, part, 0)
    phase.wall_s = time.perf_counter() - started
    phase.peak_rss_mib = peak_rss_mib(site.pid)
    return phase


@contextmanager
def slow_connections(address: str, count: int) -> Iterator[None]:
    """``count`` TCP connections trickling the HTTP/2 preface, a byte per 0.2 s each (the block
    starts once they have sent their first 5 bytes)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    host, port = address.split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(preface)):
            for sock in sockets:
                with contextlib.suppress(OSError):  # the endpoint closed it: fine
                    sock.send(preface[i : i + 1])
            if stop.wait(0.2):
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        stop.wait(1.0)
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        for sock in sockets:
            sock.close()


def slow_phase(site: Site, slow: int, fetches: int, deadline: float) -> Phase:
    """8 clients fetching while ``slow`` connections trickle bytes."""
    with slow_connections(site.address, slow):
        phase = fetch_phase(site, 8, fetches, deadline)
    phase.name = f"fetch x8 beside {slow} slow clients"
    return phase


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table(phases: list[Phase]) -> str:
    """The phases as a markdown table."""
    lines = [
        "| phase | clients | served | refused (codes) | MiB/s | requests/s | p50 ms | p95 ms "
        "| endpoint peak RSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        ms = np.asarray(p.latencies_s) * 1000
        p50, p95 = (f"{np.percentile(ms, q):.1f}" for q in (50, 95)) if len(ms) else ("-", "-")
        wall = max(p.wall_s, 1e-9)
        reasons = f"{p.refused} ({', '.join(sorted(p.reasons))})" if p.refused else "0"
        rss = f"{p.peak_rss_mib:.0f}" if p.peak_rss_mib is not None else "n/a"
        lines.append(
            f"| {p.name} | {p.clients} | {p.ok} | {reasons} | {p.bytes / wall / 2**20:.1f} "
            f"| {len(p.latencies_s) / wall:.0f} | {p50} | {p95} | {rss} |"
        )
    return "\n".join(lines)


def final_check(site: Site) -> tuple[int, int]:
    """Every expert fetched once more with a valid grant: (served, refused)."""
    transport = GrpcPeerTransport(site.client_dir, "unused", None, 1 << 30, timeout_s=10)
    phase = Phase("after", 1)
    grant = site.issuer.issue(ROUND, REQUESTER, 600)
    for digest in site.digests:
        _fetch_once(transport, site, digest, grant, phase)
    return phase.ok, phase.refused


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=str(__doc__).split("\n")[0])
    parser.add_argument("--experts", type=int, default=8, help="experts in the store (<= 64)")
    parser.add_argument("--expert-kb", type=int, default=256, help="KiB per expert (<= 4096)")
    parser.add_argument("--fetches", type=int, default=4, help="fetches per client (<= 32)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--slow", type=int, default=64, help="slow connections (<= 256)")
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds, all phases")
    args = parser.parse_args(argv)
    limits = {"experts": 64, "expert_kb": 4096, "fetches": 32, "slow": 256}
    for name, most in limits.items():
        if not 1 <= getattr(args, name) <= most:
            parser.error(f"--{name.replace('_', '-')} must be in [1, {most}]")
    if not all(1 <= c <= 128 for c in args.clients) or not 0 < args.time_limit <= 600:
        parser.error("--clients must be in [1, 128], --time-limit in (0, 600]")
    return args


@dataclass
class Result:
    """The phases, the endpoint's peak RSS before any load, whether the store is unchanged, and
    the final fetches of every expert."""

    phases: list[Phase]
    idle_rss_mib: float | None
    unchanged: bool
    after: tuple[int, int]


def run(args: argparse.Namespace, work: Path) -> Result:
    """All phases against one endpoint, then the store's check."""
    deadline = time.monotonic() + args.time_limit
    issuer, digests, oversized = make_store(work / "store", args.experts, args.expert_kb)
    max_bytes = 2 * args.expert_kb * 1024  # the experts fit, the oversized one (4x) does not
    before = store_snapshot(work / "store")
    with endpoint_process(work / "store", max_bytes) as (proc, address):
        site = Site(address, proc.pid, issuer, digests, oversized, work / "client")
        idle = peak_rss_mib(proc.pid)
        phases = [fetch_phase(site, c, args.fetches, deadline) for c in args.clients]
        phases.append(oversized_expert_phase(site, max(args.clients), deadline))
        phases.append(oversized_request_phase(site, min(8, max(args.clients)), deadline))
        phases.append(refused_phase(site, deadline))
        phases.append(slow_phase(site, args.slow, args.fetches, deadline))
        unchanged = store_snapshot(work / "store") == before
        after = final_check(site)
    return Result(phases, idle, unchanged, after)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="peer-load-") as tmp:
        result = run(args, Path(tmp))
    idle = f"{result.idle_rss_mib:.0f}" if result.idle_rss_mib is not None else "n/a"
    print(
        f"\nOne endpoint, {args.experts} experts of {args.expert_kb} KiB (limit "
        f"{2 * args.expert_kb} KiB), {args.fetches} fetches per client, loopback, "
        f"{time.monotonic() - started:.1f} s in all. Peak RSS is the endpoint's peak so far "
        f"(VmHWM); {idle} MiB before any load.\n"
    )
    print(table(result.phases))
    served, refused = result.after
    print(f"\nStore unchanged by the load (every file's SHA-256): {result.unchanged}")
    print(f"Every expert fetched afterwards: {served} served, {refused} refused")
    if not result.unchanged or refused:
        sys.exit(1)


if __name__ == "__main__":
    main()
