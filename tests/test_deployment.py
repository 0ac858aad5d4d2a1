"""A real deployment on loopback: TLS SuperLink with SuperNode authentication, three SuperNodes
with their peer endpoints, both methods run to completion, and the refusals that must happen.

Every process is started by ``fedspecialists.deploy.federation`` and stopped by PID (process
groups).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedspecialists.data.domains import IMAGE_DOMAINS
from fedspecialists.data.site_files import export_sites
from fedspecialists.deploy.certs import make_node_key
from fedspecialists.deploy.federation import LocalFederation, local_federation
from fedspecialists.deploy.hosts import Host, NamespacesUnavailableError, network_namespaces
from fedspecialists.run.checkpoint import checkpointed_round
from fedspecialists.run.local import stop_process_trees

pytestmark = pytest.mark.e2e

COMMON = "num_rounds=2 federation.num_clients=3 federation.node_wait_s=120"
FLTAC = f"model=tiny_bert suite=tiny_text {COMMON}"
MOE = (
    f"{COMMON} partition.train_per_client=60 partition.test_per_client=30 moe.channels=[4] "
    "moe.expert_hidden=16 moe.global_test_per_domain=20 fedmoe_da.num_peers=2"
)


# Each site also holds its own files (node config data-dir): partitions of the offline image and
# text benchmarks written as PNG/CSV files. A run with a files suite reads them; others partition.
SITE_DATA = "partition.train_per_client=60 partition.test_per_client=30"


NAMESPACES: dict[str, str] = {}  # why the federation runs on loopback, if it does


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("deploy")
    export_sites(f"method=fedmoe_da {SITE_DATA}", "site_images", root / "data", 3)
    export_sites(f"suite=offline_text {SITE_DATA}", "site_text", root / "data", 3)
    data_dirs = [root / "data" / f"site{i}" for i in range(3)]
    with contextlib.ExitStack() as stack:
        try:  # the SuperLink and each site on a host (network namespace) of its own
            hosts: list[Host] | None = stack.enter_context(network_namespaces(4))
        except NamespacesUnavailableError as exc:
            hosts = None
            NAMESPACES["unavailable"] = str(exc)
        with local_federation(
            root, num_sites=3, data_dirs=data_dirs, warm_sites=True, hosts=hosts
        ) as fed:
            fed.wait_for_nodes(3)
            yield fed
    pids = [p.pid for p in fed.processes]
    time.sleep(1)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, "processes left running after the federation stopped"


def _summary(out: Path, name: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((out / name / "summary.json").read_text())
    return summary


def test_the_superlink_and_each_site_are_hosts_of_their_own(federation: LocalFederation) -> None:
    """Four network namespaces, four addresses; no site reaches the SuperLink on its loopback
    (so the federation's traffic really crosses a network). Skipped where namespaces cannot be
    made: the other tests then run on loopback."""
    if "unavailable" in NAMESPACES:
        pytest.skip(f"on loopback: {NAMESPACES['unavailable']}")
    link_address, port = federation.control_address.rsplit(":", 1)
    addresses = [link_address, *(site.host.address for site in federation.sites)]
    assert len(set(addresses)) == 4 and "127.0.0.1" not in addresses
    probe = "import socket, sys; sys.exit(socket.create_connection(sys.argv[1:3]) and 0)"
    for target, reachable in ((link_address, True), ("127.0.0.1", False)):
        done = subprocess.run(
            federation.sites[0].host.command([sys.executable, "-c", probe, target, port]),
            timeout=30,
        )
        assert (done.returncode == 0) is reachable, (target, done.returncode)


def _served(fed: LocalFederation, run_id: int) -> list[int]:
    """How many messages of ``run_id`` each site's warm site ran (its log's lines)."""
    return [
        (fed.home / f"warm{site.index}.log").read_text().count(f" of run {run_id} in ")
        for site in fed.sites
    ]


def test_fltac_and_fedmoe_da_complete_over_tls(federation: LocalFederation, tmp_path: Path) -> None:
    """Both methods over TLS, their ClientApps forwarding to the sites' warm processes; then,
    site 0's warm site stopped, its ClientApps do the work themselves (the cold path)."""
    fltac = federation.run(f"{FLTAC} output.root={tmp_path} output.name=fltac")
    assert fltac.status == "finished:completed", fltac.log[-3000:]
    assert json.loads((tmp_path / "fltac" / "status.json").read_text())["status"] == "completed"
    # Per site and round: an identity query (round 1 only), a train and an evaluate message.
    assert _served(federation, fltac.run_id) == [1 + 2 * 2] * 3

    cold = federation.sites[0]
    assert cold.warm is not None
    stop_process_trees([cold.warm])
    assert not cold.warm_socket.exists()  # removed on SIGTERM: the forwarder goes cold at once

    moe = federation.run(f"method=fedmoe_da {MOE} output.root={tmp_path} output.name=moe")
    assert moe.status == "finished:completed", moe.log[-3000:]
    summary = _summary(tmp_path, "moe")
    rounds = [json.loads(x) for x in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    # Round 2: every site fetched its peers' experts from their gRPC endpoints, none refused.
    assert rounds[1]["peer_fetches"] > 0 and rounds[1]["peer_failures"] == 0
    assert summary["total_peer_bytes"] > 0
    # The experts went peer to peer: the SuperLink carried less than a fifth of what FedAvg-MoE
    # sends for the experts alone (float32, down and up, to each of 3 clients in each of 2 rounds).
    experts = summary["parameters"]["experts"]
    assert isinstance(experts, int) and experts > 0
    assert summary["total_server_bytes"] < 0.2 * (4 * experts * 2 * 3 * 2)
    # Each site kept its personal experts in its own store, one folder per run.
    for site in federation.sites:
        assert (site.store / f"run-{moe.run_id}" / "personal.safetensors").exists()
    assert _served(federation, moe.run_id) == [0, 1 + 2 * 2, 1 + 2 * 2]
    # Every ClientApp of both runs was forked from its SuperExec's fork server (prefork, the
    # loopback federation's default): one per message, 5 + 5 messages per site.
    for i in range(3):
        log = (federation.home / f"supernode{i}.log").read_text()
        assert log.count("fedspecialists-superexec: flwr-clientapp forked as pid") >= 10


@pytest.mark.slow
def test_fltac_sites_train_on_their_own_files(federation: LocalFederation, tmp_path: Path) -> None:
    """A suite of files reads each site's data-dir: nothing partitioned, no data on the server."""
    fltac = federation.run(
        "model=tiny_bert suite=site_text num_rounds=1 federation.num_clients=3 "
        f"federation.node_wait_s=120 output.root={tmp_path} output.name=own-fltac"
    )
    assert fltac.status == "finished:completed", fltac.log[-3000:]
    data = federation.home / "data"
    held = {p.parent.name for p in data.glob("site*/*/train.csv")} - set(IMAGE_DOMAINS)
    per_task = _summary(tmp_path, "own-fltac")["per_task_accuracy"]
    assert isinstance(per_task, dict) and set(per_task) == held


def test_unregistered_and_insecure_supernodes_are_refused(federation: LocalFederation) -> None:
    stranger_key, _ = make_node_key(federation.credentials, "stranger")
    site = federation.sites[0]
    unregistered = federation.start_supernode(
        site, 3, key=stranger_key, max_retries=2, log_name="unregistered.log"
    )
    insecure = federation.start_supernode(
        site, 3, tls=False, max_retries=2, log_name="insecure.log"
    )
    for process, log in ((unregistered, "unregistered.log"), (insecure, "insecure.log")):
        try:
            code = process.wait(timeout=180)
        except Exception:  # still running after its retries = it was let in
            pytest.fail(f"a SuperNode that should be refused kept running ({log})")
        assert code != 0, (federation.home / log).read_text()[-2000:]
    assert "Failed to activate SuperNode" in (federation.home / "unregistered.log").read_text()
    assert len(federation.wait_for_nodes(3)) == 3  # the three registered nodes only


@pytest.mark.slow
def test_own_files_and_an_unreachable_peer(federation: LocalFederation, tmp_path: Path) -> None:
    """FedMoE-DA on the sites' own image files, with site 2's peer endpoint down: each site
    trains on exactly the rows of its files, and the others renormalise over what arrived."""
    import pandas as pd

    site = federation.sites[2]
    assert site.peer is not None
    site.peer.terminate()
    site.peer.wait(timeout=30)
    outcome = federation.run(
        f"method=fedmoe_da suite=site_images {MOE} output.root={tmp_path} output.name=down"
    )
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    rounds = [json.loads(x) for x in (tmp_path / "down" / "metrics.jsonl").read_text().splitlines()]
    assert rounds[1]["peer_failures"] > 0 and rounds[1]["replies_ok"] == 3
    data = federation.home / "data"
    files = [
        sum(len(pd.read_csv(f)) for f in data.glob(f"site*/{domain}/train.csv"))
        for domain in IMAGE_DOMAINS
    ]
    assert rounds[0]["train_examples_per_domain"] == files
    assert rounds[-1]["personalised_accuracy"]["mean"] is not None
    assert rounds[-1]["global_accuracy"]["mean"] is None  # no site holds a global test set


@pytest.mark.slow
def test_a_supernode_then_the_serverapp_die_and_the_run_goes_on(
    federation: LocalFederation, tmp_path: Path
) -> None:
    """One run, two failures. Site 1's SuperNode (with every ClientApp under it) is SIGKILLed
    while round 2 trains and restarted: the dead node's reply is counted as lost and never stops
    the round, and the restarted node (its key registered: Flower gives it its old node id)
    trains again as client 1. Then the ServerApp process alone is SIGKILLed once round 2 is
    checkpointed; ``resume=<run folder>`` on the same federation (SuperLink and SuperNodes
    still up) ends the run with every round. One client in three sends a sign-flipped update
    each round (faults by config, in a deployment)."""
    import signal

    from fedspecialists.run.local import start_run, stop_process_trees

    overrides = (
        "model=tiny_bert suite=tiny_text num_rounds=4 federation.num_clients=3 "
        "federation.node_wait_s=120 federation.reply_timeout_s=300 train.local_steps=10 "
        "faults.kind=sign_flip faults.fraction=0.34 "  # faults by config work in a deployment
        f"output.root={tmp_path} output.name=dies"
    )
    run = tmp_path / "dies"
    start_run(federation.env, overrides, "fedspecialists-local")
    _wait_for_checkpoint(run, 1)
    site = federation.sites[1]
    assert site.supernode is not None
    stop_process_trees([site.supernode], term_wait=0, first_signal=signal.SIGKILL)
    data_dir = federation.home / "data" / "site1"
    site.supernode = federation.restart_supernode(site, 3, extra_config=f'data-dir="{data_dir}"')
    _wait_for_checkpoint(run, 2)
    _kill_the_serverapp(federation)
    outcome = federation.run(f"{overrides} resume={run}")
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed_after_round"] >= 2
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["aggregated"] for r in rounds)
    assert rounds[0]["replies_ok"] == 3 and rounds[0]["faults_injected"] == {"sign_flip": 1}
    # Round 2's third reply was lost with the dead node, or the restarted node (same node id)
    # picked up the message waiting for it and answered: never both, never neither.
    second = rounds[1]
    assert second["replies_ok"] + second["replies_failed"] + second["replies_missing"] == 3
    # The restarted SuperNode trained again: the last round has all three clients.
    assert rounds[-1]["replies_ok"] == 3, rounds[-1]


def _wait_for_checkpoint(run: Path, server_round: int) -> None:
    deadline = time.time() + 600
    while checkpointed_round(run) < server_round:
        assert time.time() < deadline, f"round {server_round} never finished"
        time.sleep(0.2)


def _kill_the_serverapp(federation: LocalFederation) -> None:
    """SIGKILL the ``flwr-serverapp`` process under the SuperLink, and only it."""
    superlink = psutil.Process(federation.processes[0].pid)
    (app,) = [
        p for p in superlink.children(recursive=True) if "flwr-serverapp" in " ".join(p.cmdline())
    ]
    app.kill()  # not our child: wait for it by polling
    gone = time.time() + 30
    with contextlib.suppress(psutil.NoSuchProcess):
        while app.is_running() and app.status() != psutil.STATUS_ZOMBIE:
            assert time.time() < gone, "the ServerApp outlived SIGKILL"
            time.sleep(0.1)
