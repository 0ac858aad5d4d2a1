"""Run the app through ``flwr run`` on a local simulation SuperLink this module owns.

``flwr run .`` starts a background SuperLink that outlives the command and exits 0 even when the
run failed. Scripts and tests here instead start the SuperLink themselves (so they know its PID and
stop it), submit the run, and read its real outcome from the SuperLink's Control API (what
``flwr ls --run-id`` reports, asked in-process: :mod:`fedspecialists.run.control`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspecialists.run.control import control_client
from fedspecialists.run.control import run_status as control_run_status

PROJECT_DIR = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalSuperLink:
    """A simulation SuperLink on loopback, started and stopped by PID."""

    home: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    port: int

    def stop(self) -> None:
        """Stop the SuperLink and everything it started, by PID.

        The SuperLink leads its own process group, but the SuperExec it spawns (and, under it, a
        running simulation with its Ray workers) start sessions of their own: their groups are
        collected first and stopped with it, so a run in progress is not orphaned.
        """
        stop_process_trees([self.process])

    def crash(self) -> None:
        """SIGKILL the SuperLink and everything it started, at once: a crash, nothing written."""
        stop_process_trees([self.process], term_wait=0.0, first_signal=signal.SIGKILL)

    def alive(self) -> bool:
        return self.process.poll() is None


def stop_process_trees(
    processes: list[subprocess.Popen[bytes]],
    term_wait: float = 20.0,
    kill_wait: float = 10.0,
    first_signal: signal.Signals = signal.SIGTERM,
) -> None:
    """Stop ``processes`` and every descendant's process group: SIGTERM (``first_signal``),
    then SIGKILL.

    Returns only once no process of those groups is left (zombies aside), or after both waits.
    Waiting on the groups, not only on ``processes``, matters: a simulation keeps shutting down
    (Ray) after the SuperLink that started it has exited.
    """
    groups: list[int] = []
    for process in processes:
        if process.poll() is None:
            for group in (process.pid, *_descendant_groups(process.pid)):
                if group not in groups:
                    groups.append(group)
    for sig, wait in ((first_signal, term_wait), (signal.SIGKILL, kill_wait)):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + wait
        while any(_group_alive(g) for g in groups) and time.monotonic() <= deadline:
            for process in processes:
                process.poll()  # reap our own children, so they do not linger as zombies
            time.sleep(0.2)
        if not any(_group_alive(g) for g in groups):
            break
    for process in processes:
        # A child that died between two polls is a zombie the group check ignores: reap it, so
        # that on return ``poll()`` reports it stopped (seen under load: a test found it "alive").
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=kill_wait)


def _descendant_groups(pid: int) -> list[int]:
    """Process groups of every descendant of ``pid`` (other than ``pid``'s own)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    groups: list[int] = []
    for child in children:
        try:
            group = os.getpgid(child.pid)
        except ProcessLookupError:
            continue
        if group != pid and group not in groups:
            groups.append(group)
    return groups


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    # Zombies still count for killpg; a group of zombies only is stopped.
    return any(
        p.status() != psutil.STATUS_ZOMBIE
        for p in psutil.process_iter(["pid"])
        if _safe_pgid(p.pid) == group
    )


def _safe_pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@contextmanager
def local_superlink(
    home: Path, extra_env: dict[str, str] | None = None
) -> Iterator[LocalSuperLink]:
    """Start ``flower-superlink --simulation`` with its own ``FLWR_HOME`` and ports; stop on exit.

    ``flwr`` commands run with :attr:`LocalSuperLink.env` find this SuperLink as the ``local``
    connection (same ports), so they never start one of their own. It starts with an empty
    database: runs an earlier SuperLink in ``home`` left unfinished (stopped mid-run) are not
    started again beside this one's (a resumed run starts from its run folder, not from here).
    """
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    forget_runs(home)
    port, control = free_port(), free_port()
    env = _superlink_env(home, port, control, extra_env or {})
    log_file = home / "superlink.log"
    process = subprocess.Popen(
        _superlink_command(home, port, control, log_file),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stop() reaches its children too
    )
    link = LocalSuperLink(home=home, process=process, env=env, port=port)
    try:
        _wait_healthy(process, port, log_file)
        yield link
    finally:
        link.stop()


STATE_DB = "state.db"


def forget_runs(home: Path) -> None:
    """Remove the SuperLink database of ``home`` (and SQLite's side files).

    A simulation SuperLink starts the unfinished runs it finds in its database, so one started
    on the database of a SuperLink that was stopped mid-run would run that run again, beside
    whatever it is started for.
    """
    for suffix in ("", "-wal", "-shm", "-journal"):
        (home / f"{STATE_DB}{suffix}").unlink(missing_ok=True)


# What every Flower process this project starts runs with: no hub, no telemetry, and never a
# `uv sync` of the app's dependencies at run time (it would fetch CUDA torch).
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def _superlink_env(
    home: Path, port: int, control: int, extra_env: dict[str, str]
) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        **OFFLINE_ENV,
        **extra_env,
    }


def _superlink_command(home: Path, port: int, control: int, log_file: Path) -> list[str]:
    return [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{control}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(home / STATE_DB),
        "--log-file",
        str(log_file),
    ]


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log_file: Path) -> None:
    """Wait (up to 60 s) for the SuperLink's health endpoint; fail if it exits or never answers."""
    deadline = time.time() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited ({process.returncode}); see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"flower-superlink not healthy after 60 s; see {log_file}")
        time.sleep(0.3)


@dataclass
class RunOutcome:
    run_id: int
    status: str
    details: dict[str, object]
    log: str


def flwr_cli(
    env: dict[str, str], *args: str, timeout: float = 300, cwd: Path = PROJECT_DIR
) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI with ``env`` (its ``FLWR_HOME`` names the SuperLink connections)."""
    return subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _json_payload(text: str) -> dict[str, Any] | None:
    """The JSON object in a ``flwr ... --format json`` output (after any log lines), or None."""
    try:
        payload = json.loads(text[text.index("{") :])
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def start_run(
    env: dict[str, str],
    overrides: str,
    connection: str | None = None,
    app_dir: Path = PROJECT_DIR,
    extra_args: Sequence[str] = (),
) -> int:
    """``flwr run`` the app (on ``connection``, else the default one) without waiting; its id."""
    args = ["run", str(app_dir), *([connection] if connection else [])]
    args += ["--run-config", f"overrides={json.dumps(overrides)}", *extra_args]
    started = flwr_cli(env, *args, "--format", "json", cwd=app_dir)
    payload = _json_payload(started.stdout)
    if payload is None or "run-id" not in payload:
        raise RuntimeError(
            f"`flwr {shlex.join(args)}` did not start a run:\n{started.stdout}\n{started.stderr}"
        )
    return int(payload["run-id"])


def read_status(
    env: dict[str, str], run_id: int, connection: str | None = None
) -> tuple[str, dict[str, object]]:
    """The run's status as the SuperLink reports it (as ``flwr ls`` words it), e.g.
    ``finished:completed``; ``unknown`` while the SuperLink cannot be asked."""
    with control_client(env, connection) as client:
        return control_run_status(client, run_id)


POLL_S = 0.5  # between two status polls: each is one in-process HTTP request (milliseconds)


def wait_for_run(
    env: dict[str, str],
    run_id: int,
    alive: Callable[[], bool],
    connection: str | None = None,
    timeout_s: float = 3600,
) -> RunOutcome:
    """Poll the run until it finishes (or ``timeout_s``), then fetch its log.

    ``alive`` says whether the SuperLink still runs: polling stops first when it does not.
    """
    deadline = time.time() + timeout_s
    status: str = "unknown"
    details: dict[str, object] = {}
    with control_client(env, connection) as client:
        while time.time() < deadline:
            if not alive():
                raise RuntimeError(f"the SuperLink stopped while run {run_id} was {status}")
            status, details = control_run_status(client, run_id)
            if status.startswith("finished"):
                break
            time.sleep(POLL_S)
    if not alive():
        return RunOutcome(run_id=run_id, status=status, details=details, log="")
    conn = [connection] if connection else []
    logs = flwr_cli(env, "log", str(run_id), *conn, "--show", timeout=120)
    return RunOutcome(run_id=run_id, status=status, details=details, log=logs.stdout + logs.stderr)


def submit_run(
    link: LocalSuperLink,
    overrides: str = "",
    num_supernodes: int = 10,
    app_dir: Path = PROJECT_DIR,
    federation_config: str = "",
) -> int:
    """``flwr run`` the app on ``link`` (simulation) without waiting; return the run id."""
    fed = f"num-supernodes={num_supernodes} {federation_config}".strip()
    return start_run(link.env, overrides, None, app_dir, ["--federation-config", fed])


def run_app(
    link: LocalSuperLink,
    overrides: str = "",
    num_supernodes: int = 10,
    app_dir: Path = PROJECT_DIR,
    timeout_s: float = 3600,
    federation_config: str = "",
) -> RunOutcome:
    """``flwr run`` the app on ``link`` and wait for the run to end; returns its real status.

    Parameters
    ----------
    overrides : str
        Hydra overrides (``"method=fedit seed=1"``), passed as the run-config ``overrides``.
    num_supernodes : int
        Simulated SuperNodes (the federation's clients).
    """
    run_id = submit_run(link, overrides, num_supernodes, app_dir, federation_config)
    return wait_for_run(link.env, run_id, link.alive, timeout_s=timeout_s)


def run_status(link: LocalSuperLink, run_id: int) -> tuple[str, dict[str, object]]:
    """The run's status on ``link``, e.g. ``finished:completed`` (refused once it has stopped)."""
    if not link.alive():
        raise RuntimeError(f"the SuperLink (PID {link.process.pid}) is no longer running")
    return read_status(link.env, run_id)
