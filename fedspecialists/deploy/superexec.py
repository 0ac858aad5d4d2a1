"""``fedspecialists-superexec``: Flower's own SuperExec, forking ClientApps from a warm process.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message; before
that process even pulls its message it starts Python and imports Flower, about 1.5 s of CPU on
a 2-core machine, paid by every site for every message (the work itself, with a warm site, is
often less). This entry point runs Flower's SuperExec unchanged except for how that process is
made: a *fork server*, forked from the SuperExec before it starts any thread, imports Flower's
ClientApp runtime once and then forks one child per message, which runs Flower's own
``flwr-clientapp`` main with exactly the arguments Flower built for it. Nothing of the app is
imported ahead: each child still installs the run's FAB and loads the ClientApp from it, so a
new app version is picked up as before (only third-party libraries it uses are imported
ahead: :data:`PREIMPORTED`). If the fork server is gone, the SuperExec starts
``flwr-clientapp`` as Flower does and says so. Every other argument is ``flower-superexec``'s::

    fedspecialists-superexec --insecure --runtime-api-address 127.0.0.1:9094 ...

``fedspecialists-supernode --prefork`` makes its SuperNode start this instead of
``flower-superexec`` (``--isolation subprocess``). The children stay in the SuperExec's process
group, as Flower's own would, so stopping that group stops them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from fedspecialists.deploy.supernode import (
    SUPEREXEC_POLL_ENV,
    cap_pull_backoff,
    replace_stdlib_module,
)

CLIENTAPP_COMMAND = "flwr-clientapp"  # Flower's TASK_TYPE_TO_COMMAND for a ClientApp task
EXECUTOR_MODULE = "flwr.supercore.superexec.executor.subprocess_executor"

log = logging.getLogger(__name__)


def run_forked(argv: Sequence[str], main: Callable[[], None]) -> int:
    """Run ``main`` as the program ``argv`` (``sys.argv`` set); its exit status."""
    sys.argv = list(argv)
    try:
        main()
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # a child must report, never fall back into the server
        traceback.print_exc()
        return 1
    return 0


def _child(conn: socket.socket, argv: list[str], quiet: bool, main: Callable[[], None]) -> None:
    """In a forked child: run ``main`` as ``argv``, then leave without returning to the server."""
    code = 1
    try:
        conn.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its own subprocesses are waited for
        if quiet:  # Flower's suppress_output: the child's output to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        code = run_forked(argv, main)
    finally:
        logging.shutdown()  # not atexit: those handlers are the SuperExec's, copied by the fork
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(conn: socket.socket, main: Callable[[], None]) -> None:
    """The fork server's loop: per request line ``{"argv": [...], "quiet": bool}``, fork a child
    running ``main`` as ``argv`` and answer ``{"pid": n}``; return when the SuperExec is gone."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    reader = conn.makefile("r", encoding="utf-8")
    for line in reader:
        request = json.loads(line)
        sys.stdout.flush()  # nothing buffered here is written twice
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reader.close()  # the child keeps nothing of the channel
            _child(conn, list(request["argv"]), bool(request.get("quiet")), main)
        conn.sendall((json.dumps({"pid": pid}) + "\n").encode())


# Third-party libraries every forked ClientApp imports even when it only forwards to a warm
# site, imported once here so every child has them: omegaconf (about 0.15 s of a child's 0.2 s
# to load the app), safetensors, and httpcore, which Flower's Runtime API client (httpx)
# imports when the child creates it (with trio: 0.1-0.2 s alone, 0.45 s median with three
# sites starting ClientApps at once on two cores). Libraries only, never the app (it comes
# from the FAB), and none whose import starts a thread (a fork copies only the calling one).
PREIMPORTED = ("omegaconf", "safetensors.numpy", "httpcore")


def preimport(names: Sequence[str] = PREIMPORTED) -> list[str]:
    """Import each of ``names`` that is installed; returns those imported."""
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # not installed: the child imports what it needs itself
            continue
        done.append(name)
    return done


def _clientapp_main() -> Callable[[], None]:
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # the import paid once

    preimport()

    # The children inherit it: a ClientApp's pulls from its SuperNode retry within the poll.
    poll = os.environ.get(SUPEREXEC_POLL_ENV)
    if poll and not cap_pull_backoff(float(poll)):
        log.warning("this Flower's object pulls are not the ones expected: their own backoff kept")
    return flwr_clientapp


class ForkServer:
    """A process, forked now, that forks ``flwr-clientapp`` children on request.

    Fork it while the calling process has no other thread (before Flower's SuperExec starts):
    a fork copies only the calling thread.
    """

    def __init__(self, load_main: Callable[[], Callable[[], None]] = _clientapp_main) -> None:
        ours, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:  # the fork server
            code = 1
            try:
                ours.close()
                serve(theirs, load_main())
                code = 0
            except BaseException:  # said before it leaves: the SuperExec falls back to Flower's
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        self._conn: socket.socket | None = ours
        self._reader = ours.makefile("r", encoding="utf-8")
        self._lock = threading.Lock()

    def launch(self, argv: Sequence[str], quiet: bool = False) -> int | None:
        """Fork a child running ``argv``; its pid, or None if the fork server is gone."""
        with self._lock:
            if self._conn is None:
                return None
            try:
                request = json.dumps({"argv": list(argv), "quiet": quiet}) + "\n"
                self._conn.sendall(request.encode())
                answer = self._reader.readline()
                if not answer:
                    raise ConnectionError("the fork server closed its end")
                return int(json.loads(answer)["pid"])
            except (OSError, ValueError) as err:
                log.warning("fork server gone (%s): ClientApps start as Flower starts them", err)
                self.close()
                return None

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the fork server: it ends when its end of the channel closes (killed by its pid
        after ``wait_s``); its children run on."""
        if self._conn is None:
            return
        self._reader.close()  # the socket's file closes only when both are closed
        self._conn.close()
        self._conn = None
        deadline = time.monotonic() + wait_s
        try:
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    return
                time.sleep(0.01)
        except ChildProcessError:  # reaped already (by whoever saw it die)
            return


class ForkingSubprocess(ModuleType):
    """The ``subprocess`` module whose ``Popen`` forks ``flwr-clientapp`` from a
    :class:`ForkServer`; other commands, and all once it is gone, are ``subprocess``'s."""

    def __init__(self, server: ForkServer) -> None:
        super().__init__("subprocess")
        self.server = server

    def Popen(self, args: Sequence[str], **kwargs: Any) -> Any:  # noqa: N802  # subprocess's name
        if list(args)[:1] == [CLIENTAPP_COMMAND]:
            quiet = kwargs.get("stdout") == subprocess.DEVNULL
            pid = self.server.launch(args, quiet)
            if pid is not None:
                log.info("flwr-clientapp forked as pid %d", pid)
                return None  # Flower's executor does not keep the Popen
        return subprocess.Popen(args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def patch_executor(server: ForkServer) -> bool:
    """Make Flower's subprocess executor fork ClientApps from ``server``; False if not found."""
    return replace_stdlib_module(EXECUTOR_MODULE, subprocess, ForkingSubprocess(server))


def _log_to_stderr() -> None:
    """This module's lines on stderr (the SuperNode's log), Flower's logging left as it is."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s fedspecialists-superexec: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main() -> None:
    server = ForkServer()  # first: no thread exists yet
    _log_to_stderr()
    if not patch_executor(server):
        server.close()
        log.warning("this Flower's SuperExec is not the one expected: ClientApps start as usual")
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *sys.argv[1:]]
    try:
        flower_superexec()
    finally:
        server.close()


if __name__ == "__main__":
    main()
