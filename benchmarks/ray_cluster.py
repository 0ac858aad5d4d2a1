"""Flower's simulation on an existing Ray cluster: a head and a worker node stand in for two hosts.

Starts a Ray head and a Ray worker (``ray start --block``, each in a process group of its own,
each offering ``--cpus-per-node`` CPUs), a simulation SuperLink with ``RAY_ADDRESS`` pointing at
the head, runs a small FL-TAC and a small FedMoE-DA run (``flwr run``, one CPU per ClientApp so
that ClientApps must be placed on both nodes), and reports each run's status and on which Ray
node each ClientApp actor ran. Everything it started is stopped by process group at the end.

Usage::

    python benchmarks/ray_cluster.py --out runs/ray_cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedspecialists.run.local import free_port, local_superlink, run_app, stop_process_trees

RUNS = {  # small versions of both methods (the e2e tests' sizes)
    "fltac": "model=tiny_bert suite=tiny_text num_rounds=2 federation.num_clients=4",
    "fedmoe_da": (
        "method=fedmoe_da num_rounds=3 federation.num_clients=4 partition.train_per_client=60"
        " partition.test_per_client=30 moe.channels=[4] moe.expert_hidden=16"
        " moe.global_test_per_domain=20 fedmoe_da.num_peers=2 fedmoe_da.mix_every=1"
    ),
}


def start_node(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``ray start ... --block`` in a new session: its whole tree is one process group."""
    return subprocess.Popen(
        ["ray", "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_nodes(address: str, count: int, timeout_s: float = 120) -> list[dict[str, Any]]:
    """The cluster's alive nodes once ``count`` of them have joined."""
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ray.init(address=address, logging_level=logging.ERROR)
            nodes = [n for n in ray.nodes() if n["Alive"]]
            ray.shutdown()
            if len(nodes) >= count:
                return nodes
        except Exception:  # the head is still starting
            ray.shutdown()
        time.sleep(2)
    raise TimeoutError(f"fewer than {count} Ray nodes joined {address} in {timeout_s} s")


def actors_per_node(address: str) -> dict[str, int]:
    """ClientApp actors (alive or dead) counted by the Ray node that ran them, read from the
    cluster's GCS (Ray's state API would need the dashboard, which a plain ``ray`` lacks)."""
    import ray
    from ray._private.state import actors

    ray.init(address=address, logging_level=logging.ERROR)
    try:
        table = actors()
    finally:
        ray.shutdown()
    nodes = [a["Address"]["NodeID"] for a in table.values() if "ClientApp" in a["ActorClassName"]]
    return dict(Counter(nodes))


def forget_cluster(address: str) -> None:
    """Remove Ray's note of the cluster it last started (``ray stop`` does; a killed head does
    not): a later ``ray.init()`` without an address, as in every Flower simulation, would try
    to join the dead cluster and hang."""
    note = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if note.exists() and note.read_text().strip().endswith(address.rsplit(":", 1)[1]):
        note.unlink()


def run(out: Path, cpus_per_node: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(
        ["--head", "--include-dashboard=false", f"--port={port}", f"--num-cpus={cpus_per_node}"],
        out / "ray-head.log",
    )
    nodes: list[subprocess.Popen[bytes]] = [head]
    result: dict[str, Any] = {"ray_address": address, "cpus_per_node": cpus_per_node}
    try:
        time.sleep(5)
        nodes.append(
            start_node(
                [f"--address={address}", f"--num-cpus={cpus_per_node}"], out / "ray-worker.log"
            )
        )
        joined = wait_for_nodes(address, 2)
        result["ray_nodes"] = {n["NodeID"]: n["Resources"].get("CPU") for n in joined}
        with local_superlink(out / "flwr-home", {"RAY_ADDRESS": address}) as link:
            for name, overrides in RUNS.items():
                started = time.time()
                outcome = run_app(
                    link,
                    f"{overrides} output.root={out} output.name={name}",
                    num_supernodes=4,
                    federation_config="client-resources-num-cpus=1",
                    timeout_s=1800,
                )
                result[name] = {
                    "status": outcome.status,
                    "wall_s": round(time.time() - started, 1),
                    "run_folder_status": json.loads((out / name / "status.json").read_text()),
                }
        result["client_app_actors_per_node"] = actors_per_node(address)
    finally:
        # Each node's tree and every process group below it (Ray's workers start their own).
        stop_process_trees(nodes)
        forget_cluster(address)
    (out / "ray_cluster.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ray_cluster"))
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.out.resolve(), args.cpus_per_node), indent=2))


if __name__ == "__main__":
    main()
