"""A real Flower deployment on one machine: a TLS SuperLink with SuperNode authentication,
SuperNodes with their node config, and a FedMoE-DA peer endpoint per site.

This is the multi-machine runbook (docs/deployment.md) played on loopback, for trying it and for
the tests: every process is started here and stopped by PID (its process group). The SuperLink
is Flower's own executable, the SuperNodes Flower's own run through ``fedspecialists-supernode``
(polling sooner; ``supernode_poll_s=None``: ``flower-supernode`` itself); the ClientApps and
ServerApp are this app.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedspecialists.deploy.certs import make_ca, make_node_key, make_server_cert
from fedspecialists.deploy.hosts import LOOPBACK, Host
from fedspecialists.deploy.supernode import DEFAULT_POLL_S
from fedspecialists.run.control import control_client, online_nodes
from fedspecialists.run.local import (
    OFFLINE_ENV,
    POLL_S,
    RunOutcome,
    flwr_cli,
    free_port,
    start_run,
    stop_process_trees,
    wait_for_run,
)
from fedspecialists.site.warm import healthy

CONNECTION = "fedspecialists-local"


@dataclass
class Site:
    """One organisation: its SuperNode, its peer endpoint and their settings."""

    index: int
    node_key: Path
    node_pub: Path
    store: Path
    peer_port: int
    host: Host = LOOPBACK  # where its SuperNode, peer endpoint and warm site run
    supernode: subprocess.Popen[bytes] | None = None
    peer: subprocess.Popen[bytes] | None = None
    warm: subprocess.Popen[bytes] | None = None  # its warm site (fedspecialists-site), if any

    @property
    def warm_socket(self) -> Path:
        return self.store.parent / "warm" / "site.sock"

    @property
    def warm_secret(self) -> Path:
        return self.store.parent / "warm.secret"


@dataclass
class LocalFederation:
    """Processes and credentials of a loopback deployment (see :func:`local_federation`)."""

    home: Path
    credentials: Path
    env: dict[str, str]
    fleet_address: str
    control_address: str
    superlink: subprocess.Popen[bytes]
    sites: list[Site] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # SuperNodes poll for work every this many seconds (fedspecialists-supernode); None: Flower's
    # own flower-supernode (3 s idle wait, its SuperExec 1 s).
    supernode_poll_s: float | None = DEFAULT_POLL_S
    # SuperNodes' ClientApps forked from a process that imported Flower once
    # (fedspecialists-supernode --prefork; fedspecialists.deploy.superexec)
    prefork: bool = False

    # -- processes -----------------------------------------------------------------------------
    def _spawn(
        self, command: list[str], log: Path, host: Host = LOOPBACK
    ) -> subprocess.Popen[bytes]:
        handle = log.open("ab")
        process = subprocess.Popen(
            host.command(command),  # `ip netns exec` execs in place: the PID is the process's
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches its children
        )
        self.processes.append(process)
        return process

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return flwr_cli(self.env, *args, timeout=timeout)

    def register(self, public_key: Path) -> subprocess.CompletedProcess[str]:
        """``flwr supernode register`` a SuperNode's public key with the SuperLink."""
        return self.flwr("supernode", "register", str(public_key), CONNECTION)

    def start_supernode(
        self,
        site: Site,
        num_sites: int,
        tls: bool = True,
        key: Path | None = None,
        extra_config: str = "",
        max_retries: int | None = None,
        log_name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a SuperNode for ``site`` (its data partition and peer endpoint in node config).

        ``max_retries`` bounds its reconnection attempts (by default it retries for ever, as a
        SuperNode waiting for its SuperLink should).
        """
        node_config = (
            f"partition-id={site.index} num-partitions={num_sites} "
            f'peer-store="{site.store}" peer-address="{site.host.address}:{site.peer_port}" '
            f'peer-root-certificates="{self.credentials / "ca.crt"}" {extra_config}'
        ).strip()
        if "num-threads=" not in extra_config:  # the sites share this machine's cores
            node_config += f" num-threads={max(1, (os.cpu_count() or 1) // num_sites)}"
        if site.warm is not None:  # its ClientApps forward to the warm site
            node_config += f' warm-site="{site.warm_socket}" warm-site-secret="{site.warm_secret}"'

        command = ["flower-supernode"]
        if self.supernode_poll_s is not None:  # Flower's SuperNode, polling sooner
            poll = ["--poll-s", str(self.supernode_poll_s)]
            command = [sys.executable, "-m", "fedspecialists.deploy.supernode", *poll]
            command += ["--prefork"] if self.prefork else []
        command += [
            "--superlink",
            self.fleet_address,
            "--port",
            str(free_port()),
            "--isolation",
            "subprocess",
            "--node-config",
            node_config,
        ]
        if tls:
            command += ["--root-certificates", str(self.credentials / "ca.crt")]
            command += ["--auth-supernode-private-key", str(key or site.node_key)]
        else:
            command += ["--insecure"]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        log = self.home / (log_name or f"supernode{site.index}.log")
        return self._spawn(command, log, site.host)

    def restart_supernode(
        self, site: Site, num_sites: int, extra_config: str = "", within_s: float = 300
    ) -> subprocess.Popen[bytes]:
        """Start ``site``'s SuperNode again after it died, until the SuperLink takes it.

        Flower's SuperLink refuses to activate a registered public key while the node that held
        it still counts as online (until it misses two heartbeats), and the refused SuperNode
        exits (code 305) instead of retrying: so start it again every few seconds.
        """
        deadline = time.time() + within_s
        while True:
            process = self.start_supernode(site, num_sites, extra_config=extra_config)
            try:
                process.wait(timeout=15)  # refused within seconds, or it stays up
            except subprocess.TimeoutExpired:
                return process
            if time.time() > deadline:
                raise RuntimeError(f"site {site.index}'s SuperNode was refused for {within_s}s")
            time.sleep(5)

    def start_peer(self, site: Site) -> subprocess.Popen[bytes]:
        c = self.credentials
        return self._spawn(
            [
                sys.executable,
                "-m",
                "fedspecialists.peer.grpc_endpoint",
                "--store",
                str(site.store),
                "--host",
                site.host.address,
                "--port",
                str(site.peer_port),
                "--certfile",
                str(c / f"peer{site.index}.crt"),
                "--keyfile",
                str(c / f"peer{site.index}.key"),
            ],
            self.home / f"peer{site.index}.log",
            site.host,
        )

    def start_warm_site(self, site: Site, timeout_s: float = 60) -> subprocess.Popen[bytes]:
        """Start ``site``'s warm site and wait until it answers its health check."""
        command = [sys.executable, "-m", "fedspecialists.site.warm"]
        command += ["--socket", str(site.warm_socket), "--secret-file", str(site.warm_secret)]
        site.warm = self._spawn(command, self.home / f"warm{site.index}.log", site.host)
        deadline = time.time() + timeout_s
        while not healthy(site.warm_socket, site.warm_secret, timeout=5):
            if site.warm.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"site {site.index}'s warm site did not start; see its log")
            time.sleep(0.2)
        return site.warm

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict[str, object]]:
        """Until ``count`` SuperNodes are online (as ``flwr supernode list`` would list them)."""
        deadline = time.time() + timeout_s
        nodes: list[dict[str, object]] = []
        with control_client(self.env, CONNECTION) as client:
            while time.time() < deadline:
                nodes = online_nodes(client)
                if len(nodes) >= count:
                    return nodes
                time.sleep(POLL_S)
        raise RuntimeError(f"only {len(nodes)} of {count} SuperNodes online after {timeout_s}s")

    # -- runs ----------------------------------------------------------------------------------
    def run(self, overrides: str, timeout_s: float = 1800) -> RunOutcome:
        """``flwr run`` the app on this federation; wait for and return its real status."""
        run_id = start_run(self.env, overrides, CONNECTION)
        superlink = self.processes[0]
        return wait_for_run(
            self.env, run_id, lambda: superlink.poll() is None, CONNECTION, timeout_s
        )

    def stop(self) -> None:
        """Stop every process started here (their process groups), SIGTERM then SIGKILL."""
        stop_process_trees(self.processes, term_wait=15.0, kill_wait=5.0)


@contextmanager
def local_federation(
    home: Path,
    num_sites: int = 3,
    register: bool = True,
    start_nodes: bool = True,
    data_dirs: Sequence[Path] | None = None,
    warm_sites: bool = False,
    hosts: Sequence[Host] | None = None,
    supernode_poll_s: float | None = DEFAULT_POLL_S,
    prefork: bool | None = None,
) -> Iterator[LocalFederation]:
    """Credentials, a TLS SuperLink with SuperNode authentication, ``num_sites`` sites.

    Each site gets an EC key pair (registered with the SuperLink when ``register``), a SuperNode
    whose node config names its partition (or its own files: ``data_dirs[i]`` as ``data-dir``),
    its store and its peer endpoint, and that endpoint (gRPC over TLS); with ``warm_sites``, a
    warm site per site too (its SuperNode's ClientApps forward to it). SuperNodes poll for work
    every ``supernode_poll_s`` seconds (:mod:`fedspecialists.deploy.supernode`; None: Flower's
    own ``flower-supernode``); with ``prefork`` (default: wherever they are
    ``fedspecialists-supernode``) they fork their ClientApps from a process that imported
    Flower once (:mod:`fedspecialists.deploy.superexec`). ``hosts`` (default: all
    on loopback) places the SuperLink on ``hosts[0]`` and site ``i`` on ``hosts[i + 1]``, each
    with certificates for its address (see :func:`fedspecialists.deploy.hosts.network_namespaces`).
    Everything is stopped, by PID, on exit.
    """
    hosts = list(hosts) if hosts is not None else [LOOPBACK] * (num_sites + 1)
    if prefork and supernode_poll_s is None:
        raise ValueError("prefork needs fedspecialists-supernode (supernode_poll_s not None)")
    prefork = supernode_poll_s is not None if prefork is None else prefork
    if len(hosts) != num_sites + 1:
        raise ValueError(f"{len(hosts)} hosts for a SuperLink and {num_sites} sites")
    if data_dirs is not None and len(data_dirs) != num_sites:
        raise ValueError(f"{len(data_dirs)} data dirs for {num_sites} sites")
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    creds = home / "credentials"
    ca, ca_key = make_ca(creds)
    make_server_cert(creds, "server", _names(hosts[0]), ca, ca_key)
    # Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port.
    port = free_port()
    fleet = control = f"{hosts[0].address}:{port}"
    env = _flwr_env(home / "flwr-home", control, ca)
    log = (home / "superlink.log").open("ab")
    superlink = subprocess.Popen(
        hosts[0].command(_superlink_command(home, creds, ca, hosts[0].address, port)),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fed = LocalFederation(
        home, creds, env, fleet, control, superlink, [], [superlink], supernode_poll_s, prefork
    )
    try:
        _wait_port(control, superlink, home / "superlink.log")
        for i in range(num_sites):
            make_server_cert(creds, f"peer{i}", _names(hosts[i + 1]), ca, ca_key)
            data_dir = Path(data_dirs[i]) if data_dirs else None
            _add_site(fed, i, num_sites, register, start_nodes, data_dir, warm_sites, hosts[i + 1])
        yield fed
    finally:
        fed.stop()


def _flwr_env(flwr_home: Path, control: str, ca: Path) -> dict[str, str]:
    """The processes' environment, with a ``flwr`` config whose default connection is ours."""
    flwr_home.mkdir(exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{control}"\nroot-certificates = "{ca}"\n'
    )
    return {**os.environ, "FLWR_HOME": str(flwr_home), **OFFLINE_ENV}


def _names(host: Host) -> list[str]:
    """What a host's certificate is issued for: its address (and loopback's names)."""
    return list(dict.fromkeys([host.address, "127.0.0.1", "localhost"]))


def _superlink_command(home: Path, creds: Path, ca: Path, address: str, port: int) -> list[str]:
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(creds / "server.crt"),
        "--ssl-keyfile",
        str(creds / "server.key"),
        "--enable-supernode-auth",
        "--host",
        address,
        "--port",
        str(port),
        "--isolation",
        "subprocess",
        "--database",
        str(home / "state.db"),
    ]


def _add_site(
    fed: LocalFederation,
    i: int,
    num_sites: int,
    register: bool,
    start_node: bool,
    data_dir: Path | None,
    warm: bool = False,
    host: Host = LOOPBACK,
) -> None:
    """Site ``i``: its node key (registered if ``register``), peer endpoint, warm site (if
    ``warm``) and SuperNode."""
    key, pub = make_node_key(fed.credentials, f"supernode{i}")
    site = Site(i, key, pub, fed.home / f"site{i}" / "store", free_port(), host)
    site.store.mkdir(parents=True, exist_ok=True)
    fed.sites.append(site)
    if register:
        done = fed.register(pub)
        if done.returncode != 0:
            raise RuntimeError(f"registering {pub} failed:\n{done.stdout}\n{done.stderr}")
    site.peer = fed.start_peer(site)
    if warm:
        fed.start_warm_site(site)
    if start_node:
        own = f'data-dir="{data_dir.resolve()}"' if data_dir is not None else ""
        site.supernode = fed.start_supernode(site, num_sites, extra_config=own)


def _wait_port(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{shlex.join(process.args)} exited; see {log}")  # type: ignore[arg-type]
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {address} after 60 s; see {log}")
