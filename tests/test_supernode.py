"""``fedspecialists-supernode``: Flower's SuperNode with its polling waits capped."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from flwr.supernode import start_client_internal

from fedspecialists.deploy import supernode


def test_capped_sleep_waits_at_most_the_poll_interval() -> None:
    waited: list[float] = []
    sleep = supernode.capped_sleep(0.2, waited.append)
    for seconds in (3.0, 0.5, 0.2, 0.05, 0.0):
        sleep(seconds)
    assert waited == [0.2, 0.2, 0.2, 0.05, 0.0]


def test_polling_clock_is_time_but_for_sleep() -> None:
    clock = supernode.PollingClock(0.01)
    assert clock.time is time.time and clock.monotonic is time.monotonic
    start = time.monotonic()
    clock.sleep(3)  # Flower's idle wait
    assert time.monotonic() - start < 1.0


def test_the_supernode_loop_is_patched_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(start_client_internal, "time", time)  # undone after the test
    assert supernode.patch_message_loop(0.01)
    assert isinstance(start_client_internal.time, supernode.PollingClock)
    start = time.monotonic()
    start_client_internal.time.sleep(3)
    assert time.monotonic() - start < 1.0
    # Patched already (not the ``time`` module any more): a second patch leaves it alone.
    assert not supernode.patch_message_loop(0.5)


def test_arguments_split_between_ours_and_flowers() -> None:
    argv = ["--superlink", "h:9092", "--poll-s", "0.5", "--insecure", "--node-config", "a=1"]
    ours, rest = supernode.split_args(argv)
    assert (ours.poll_s, ours.prefork) == (0.5, False)
    assert rest == ["--superlink", "h:9092", "--insecure", "--node-config", "a=1"]
    ours, rest = supernode.split_args(["--insecure", "--prefork"])
    assert (ours.poll_s, ours.prefork, rest) == (supernode.DEFAULT_POLL_S, True, ["--insecure"])


def test_prefork_starts_our_superexec_with_flowers_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **_: started.append(list(args)))
    shim = supernode.PreforkingSubprocess()
    shim.Popen(["flower-superexec", "--insecure", "--parent-pid", "7"])
    shim.Popen(["something-else", "-x"])
    assert [sys.executable, "-m", "fedspecialists.deploy.superexec"] == supernode.PREFORK_SUPEREXEC
    assert started == [
        [*supernode.PREFORK_SUPEREXEC, "--insecure", "--parent-pid", "7"],
        ["something-else", "-x"],
    ]
    assert shim.DEVNULL == subprocess.DEVNULL  # the rest is subprocess's
    monkeypatch.setattr(start_client_internal, "subprocess", subprocess)  # undone after the test
    assert supernode.patch_superexec_command()
    assert isinstance(start_client_internal.subprocess, supernode.PreforkingSubprocess)
    assert not supernode.patch_superexec_command()  # patched already: left alone


@pytest.mark.parametrize("value", ["0", "0.001", "3.5", "60"])
def test_a_poll_interval_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(SystemExit, match="--poll-s must be in"):
        supernode.split_args(["--poll-s", value])


@pytest.mark.parametrize("value", ["0.01", "3"])
def test_the_range_bounds_are_accepted(value: str) -> None:
    assert supernode.split_args(["--poll-s", value])[0].poll_s == float(value)


@pytest.fixture
def pull_defaults(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Flower's pull functions' keyword defaults, with Flower 1.42's backoff (1 s, doubling up
    to 10 s), put back as they were after the test."""
    import importlib

    module = importlib.import_module(supernode.PULL_MODULE)
    defaults = []
    for name in supernode.PULL_FUNCTIONS:
        function = getattr(module, name)
        fresh = {**function.__kwdefaults__, "initial_backoff": 1, "backoff_cap": 10}
        monkeypatch.setattr(function, "__kwdefaults__", fresh)
        defaults.append(function.__kwdefaults__)
    return defaults


def test_flower_retries_a_missing_object_within_the_poll_interval(
    pull_defaults: list[dict[str, object]],
) -> None:
    import inspect

    from flwr.supercore.inflatable import inflatable_utils

    assert supernode.cap_pull_backoff(0.2)
    assert [(d["initial_backoff"], d["backoff_cap"]) for d in pull_defaults] == [(0.2, 0.2)] * 2
    # What a caller that leaves the arguments out (all of Flower's) now gets:
    parameters = inspect.signature(inflatable_utils.pull_objects).parameters
    assert parameters["initial_backoff"].default == 0.2
    assert parameters["backoff_cap"].default == 0.2  # no doubling past the poll interval
    assert supernode.cap_pull_backoff(5.0)  # never raised
    assert [(d["initial_backoff"], d["backoff_cap"]) for d in pull_defaults] == [(0.2, 0.2)] * 2


def test_pulls_that_are_not_flowers_are_left_alone() -> None:
    assert not supernode.cap_pull_backoff(0.2, module="fedspecialists.trace")  # no such functions
    assert not supernode.cap_pull_backoff(0.2, module="no_such_module_here")


def test_forked_clientapps_retry_within_their_supernodes_poll(
    pull_defaults: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedspecialists.deploy import superexec

    monkeypatch.setenv(supernode.SUPEREXEC_POLL_ENV, "0.3")  # what fedspecialists-supernode sets
    main = superexec._clientapp_main()  # in the fork server, before any child is forked
    assert callable(main)
    assert [(d["initial_backoff"], d["backoff_cap"]) for d in pull_defaults] == [(0.3, 0.3)] * 2
