"""A run's status from the SuperLink's Control API, asked in-process.

``flwr ls`` answers the same question, but each call is a new Python process importing Flower
(about 0.8 CPU-seconds here): polled every second it took a sizeable share of a 2-core machine
from the run it watched, and polled rarely it left up to 8 s between a run's end and our
noticing. Flower's own HTTP client for the Control API (the one ``flwr`` uses) asks in a few
milliseconds, so a run can be polled twice a second for nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.cli.config_utils import load_certificate_in_connection
from flwr.cli.flower_config import read_superlink_connection
from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest  # pylint: disable=E0611
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

LOCAL_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"


@contextmanager
def control_client(env: dict[str, str], connection: str | None = None) -> Iterator[Any]:
    """A Control API client for the SuperLink that ``flwr`` run with ``env`` would reach.

    Parameters
    ----------
    env : dict of str to str
        The environment ``flwr`` commands run with: ``FLWR_HOME`` and, for a local simulation
        SuperLink, its HTTP API port.
    connection : str, optional
        A connection named in ``$FLWR_HOME/config.toml`` (its address and CA certificate);
        ``None`` for the local SuperLink on ``env``'s port.
    """
    if connection is None:
        address, insecure, certificates = f"127.0.0.1:{env[LOCAL_PORT_ENV]}", True, None
    else:
        with _flwr_home(env["FLWR_HOME"]):  # Flower reads its config from the environment
            link = read_superlink_connection(connection)
        address, insecure = str(link.address), bool(link.insecure)
        certificates = load_certificate_in_connection(link)
    client = ControlHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            CliClientHttpInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
        ],
    )
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _flwr_home(home: str) -> Iterator[None]:
    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = home
    try:
        yield
    finally:
        if before is None:
            del os.environ["FLWR_HOME"]
        else:
            os.environ["FLWR_HOME"] = before


def run_status(client: Any, run_id: int) -> tuple[str, dict[str, object]]:
    """The run's status as ``flwr ls`` words it (``finished:completed``), and its details.

    ``("unknown", {"error": ...})`` when the SuperLink cannot be asked (not up yet, restarting).
    """
    try:
        runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
    except (httpx.HTTPError, ValueError) as exc:
        return "unknown", {"error": f"{type(exc).__name__}: {exc}"}
    if run_id not in runs:
        return "unknown", {"error": f"run {run_id} not listed"}
    status = runs[run_id].status
    text = f"{status.status}:{status.sub_status}" if status.sub_status else status.status
    return text, {"run-id": run_id, "status": text, "details": status.details}


def online_nodes(client: Any) -> list[dict[str, object]]:
    """The SuperNodes the SuperLink counts online (as ``flwr supernode list`` lists them);
    ``[]`` while it cannot be asked."""
    try:
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
    except (httpx.HTTPError, ValueError):
        return []
    return [
        {"node-id": n.node_id, "owner": n.owner_name, "status": n.status}
        for n in nodes
        if n.status == "online"
    ]
