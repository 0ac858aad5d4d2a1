"""``fedspecialists-superexec``: ClientApps forked from a process that imported Flower once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedspecialists.deploy import superexec


def _record_argv() -> None:
    """A stand-in ClientApp main: writes its argv and pid to the file named by argv[1]."""
    Path(sys.argv[1]).write_text(json.dumps({"argv": sys.argv, "pid": os.getpid()}))
    if sys.argv[2:] == ["fail"]:
        raise SystemExit(3)


def _wait_for(path: Path, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return json.loads(path.read_text())


def _loader() -> Callable[[], None]:
    return _record_argv


def test_run_forked_reports_the_exit_status() -> None:
    def exits(code: object) -> Callable[[], None]:
        def main() -> None:
            raise SystemExit(code)

        return main

    def crashes() -> None:
        raise RuntimeError("boom")

    assert superexec.run_forked(["x"], lambda: None) == 0
    assert superexec.run_forked(["x"], exits(None)) == 0
    assert superexec.run_forked(["x"], exits(4)) == 4
    assert superexec.run_forked(["x"], exits("message")) == 1
    assert superexec.run_forked(["x"], crashes) == 1


def test_the_fork_server_runs_each_request_in_its_own_child(tmp_path: Path) -> None:
    server = superexec.ForkServer(load_main=_loader)
    try:
        first, second = tmp_path / "a.json", tmp_path / "b.json"
        pid_a = server.launch(["flwr-clientapp", str(first)])
        pid_b = server.launch(["flwr-clientapp", str(second), "fail"])
        a, b = _wait_for(first), _wait_for(second)
        assert a == {"argv": ["flwr-clientapp", str(first)], "pid": pid_a}
        assert b["pid"] == pid_b and len({pid_a, pid_b, server.pid, os.getpid()}) == 4
    finally:
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 2.0  # it left on its own, not killed after 5 s
    assert server.launch(["flwr-clientapp", str(tmp_path / "c.json")]) is None  # closed
    with pytest.raises(ChildProcessError):  # the fork server was reaped by close()
        os.waitpid(server.pid, os.WNOHANG)


def test_a_dead_fork_server_falls_back_to_flowers_own_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = superexec.ForkServer(load_main=_loader)
    os.kill(server.pid, 9)
    os.waitpid(server.pid, 0)
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **_: started.append(list(args)))
    shim = superexec.ForkingSubprocess(server)
    shim.Popen(["flwr-clientapp", "--token", "t"], stdout=subprocess.DEVNULL)
    shim.Popen(["other", "--flag"])
    assert started == [["flwr-clientapp", "--token", "t"], ["other", "--flag"]]
    assert server.launch(["flwr-clientapp"]) is None  # given up for good
    assert shim.PIPE == subprocess.PIPE  # the rest is subprocess's


def test_the_executor_patch_forks_clientapps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.superexec.executor import subprocess_executor

    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess)  # undone after the test
    server = superexec.ForkServer(load_main=_loader)
    try:
        assert superexec.patch_executor(server)
        assert not superexec.patch_executor(server)  # patched already: left alone
        out = tmp_path / "out.json"
        subprocess_executor.subprocess.Popen(["flwr-clientapp", str(out)])
        assert _wait_for(out)["argv"] == ["flwr-clientapp", str(out)]
    finally:
        server.close()


def test_the_real_clientapp_main_is_loaded_once_in_the_server() -> None:
    main = superexec._clientapp_main()
    assert main.__module__ == "flwr.supernode.cli.flwr_clientapp"


def test_the_fork_server_imports_the_apps_libraries_not_the_app() -> None:
    """The libraries a forwarding ClientApp needs are imported once; a missing one is skipped;
    nothing of the app is in the list (it is loaded from the run's FAB in each child)."""
    import sys

    assert superexec.preimport(("omegaconf", "no_such_library_xyz")) == ["omegaconf"]
    assert "omegaconf" in sys.modules
    assert not any(
        name.split(".")[0] in ("client_app", "server_app", "strategies", "fedspecialists")
        for name in superexec.PREIMPORTED
    )


def test_the_preimported_libraries_start_no_thread() -> None:
    """A fork copies only the calling thread: what the fork server imports must start none."""
    code = (
        "import threading\n"
        "from fedspecialists.deploy import superexec\n"
        "done = superexec.preimport()\n"
        "assert done == list(superexec.PREIMPORTED), done\n"
        "print(threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
