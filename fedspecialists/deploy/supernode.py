"""``fedspecialists-supernode``: Flower's own ``flower-supernode``, polling for work sooner.

Flower 1.42's SuperNode, when it finds no message for it, sleeps 3 s (hard-coded) before it
asks its SuperLink again, and its SuperExec looks for a ClientApp to start once a second: each
phase of a round (train, evaluate) waits for both, 2-4 s in all, whatever the work. This entry
point runs Flower's SuperNode unchanged except for those waits: every sleep of the SuperNode's
message loop (the idle wait, and its 0.5 s waits for a reply) is capped at ``--poll-s`` seconds
(default 0.2), and its SuperExec gets the same interval through Flower's own variable
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (unless already set). Every other argument is
``flower-supernode``'s::

    fedspecialists-supernode --poll-s 0.2 --superlink HOST:9092 --isolation subprocess ...

The cost is requests: an idle SuperNode asks its SuperLink ``1 / poll_s`` times a second
instead of once every 3 s. ``--poll-s 3`` is Flower's behaviour. If a later Flower no longer
has the loop this patches, the SuperNode runs unpatched and says so.

With ``--prefork`` (``--isolation subprocess``), the SuperNode starts
``fedspecialists-superexec`` instead of ``flower-superexec``: Flower's SuperExec, forking each
message's ``flwr-clientapp`` from a process that has imported Flower already
(:mod:`fedspecialists.deploy.superexec`).

Flower's retries of an object that is not there yet come every ``--poll-s`` at most too, in
the SuperNode and in the ClientApps forked for it (:func:`cap_pull_backoff`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

DEFAULT_POLL_S = 0.2
LOOP_MODULE = "flwr.supernode.start_client_internal"  # Flower's SuperNode message loop
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own, read by flower-superexec
POLL_RANGE = (0.01, 3.0)  # SuperExec accepts [0.01, 60]; above 3 s this would slow Flower down

log = logging.getLogger(__name__)


def capped_sleep(
    poll_s: float, sleep: Callable[[float], None] = time.sleep
) -> Callable[[float], None]:
    """A ``sleep`` that never waits longer than ``poll_s`` seconds (the loops around it poll)."""

    def _sleep(seconds: float) -> None:
        sleep(min(seconds, poll_s))

    return _sleep


class PollingClock(ModuleType):
    """The ``time`` module with :func:`capped_sleep` as its ``sleep``; all else is ``time``'s."""

    def __init__(self, poll_s: float) -> None:
        super().__init__("time")
        self.sleep = capped_sleep(poll_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def replace_stdlib_module(module: str, stdlib: ModuleType, shim: ModuleType) -> bool:
    """In Flower's ``module``, replace its global ``stdlib`` (e.g. ``time``) by ``shim``;
    False, and nothing changed, if that module or global is not the one this was written for
    (or was replaced already)."""
    try:
        target = importlib.import_module(module)
    except ImportError:
        return False
    name = stdlib.__name__
    if getattr(target, name, None) is not stdlib:
        return False
    setattr(target, name, shim)
    return True


def patch_message_loop(poll_s: float) -> bool:
    """Cap the sleeps of Flower's SuperNode message loop at ``poll_s``; False if not found."""
    return replace_stdlib_module(LOOP_MODULE, time, PollingClock(poll_s))


SUPEREXEC_COMMAND = "flower-superexec"  # what Flower's SuperNode starts (subprocess isolation)
PREFORK_SUPEREXEC = [sys.executable, "-m", "fedspecialists.deploy.superexec"]


class PreforkingSubprocess(ModuleType):
    """The ``subprocess`` module whose ``Popen`` starts ``fedspecialists-superexec`` where
    Flower's SuperNode asks for ``flower-superexec``; all else is ``subprocess``'s."""

    def __init__(self) -> None:
        super().__init__("subprocess")

    def Popen(self, args: Sequence[str], **kwargs: Any) -> Any:  # noqa: N802  # subprocess's name
        args = list(args)
        if args[:1] == [SUPEREXEC_COMMAND]:
            args = [*PREFORK_SUPEREXEC, *args[1:]]
        return subprocess.Popen(args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def patch_superexec_command() -> bool:
    """Make Flower's SuperNode start ``fedspecialists-superexec``; False if not found."""
    return replace_stdlib_module(LOOP_MODULE, subprocess, PreforkingSubprocess())


PULL_MODULE = "flwr.supercore.inflatable.inflatable_utils"  # Flower's object pulls
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
BACKOFF_KEYS = {"initial_backoff", "backoff_cap"}  # their keyword arguments that wait


def cap_pull_backoff(seconds: float, module: str = PULL_MODULE) -> bool:
    """Make Flower's pulls in this process retry a missing object every ``seconds`` at most.

    Flower 1.42 passes a message on in two steps, its header and then its content (objects),
    and the next hop may ask for an object before it has arrived: a ClientApp pulling from its
    SuperNode, a SuperNode from its SuperLink, the ServerApp a reply. Told "unavailable",
    Flower waits ``PULL_INITIAL_BACKOFF`` = 1 s, then doubles the wait up to 10 s. Measured
    with :mod:`fedspecialists.trace`: 1.1-1.2 s of the 1.5-2 s a forked FedMoE-DA ClientApp
    took to reach its message, and for FL-TAC, whose server takes seconds to push a round's
    adapters, the doubling on two hops in a row (SuperNode, then ClientApp) overshot by up to
    10 s. This lowers the keyword defaults ``initial_backoff`` and ``backoff_cap`` of Flower's
    pull functions to ``seconds`` (never raises them): a missing object is asked for again
    every ``seconds`` until it is there or Flower's own time limit ends. False, and nothing
    changed, if those functions are not there.
    """
    try:
        target = importlib.import_module(module)
    except ImportError:
        return False
    functions = [getattr(target, name, None) for name in PULL_FUNCTIONS]
    defaults = [getattr(f, "__kwdefaults__", None) or {} for f in functions]
    if not all(d.keys() >= BACKOFF_KEYS for d in defaults):
        return False
    for d in defaults:
        for key in BACKOFF_KEYS:
            d[key] = min(float(d[key]), seconds)
    return True


def split_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--poll-s`` and ``--prefork`` (ours) and every other argument (``flower-supernode``'s),
    in their order."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S)
    parser.add_argument("--prefork", action="store_true")
    ours, rest = parser.parse_known_args(list(argv))
    low, high = POLL_RANGE
    if not low <= ours.poll_s <= high:
        raise SystemExit(f"--poll-s must be in [{low}, {high}] seconds, got {ours.poll_s}")
    ours.poll_s = float(ours.poll_s)
    return ours, rest


def _warn(message: str) -> None:
    logging.basicConfig(level=logging.WARNING)  # only now: Flower configures its own logging
    log.warning(message)


def main() -> None:
    ours, rest = split_args(sys.argv[1:])
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(ours.poll_s))  # its child SuperExec reads it
    if not patch_message_loop(ours.poll_s):
        _warn("this Flower's SuperNode loop is not the one expected: its own polling kept")
    if not cap_pull_backoff(ours.poll_s):
        _warn("this Flower's object pulls are not the ones expected: their own backoff kept")
    if ours.prefork and not patch_superexec_command():
        _warn("this Flower's SuperNode does not start its SuperExec as expected: no prefork")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
