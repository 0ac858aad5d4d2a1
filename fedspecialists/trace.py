"""Where a deployment round's time goes: timestamped events from every process of a run.

Off unless the environment variable ``FEDSPECIALISTS_TRACE`` names a file. Then the ServerApp
(a phase's messages counted as sent, its push of them returned, its replies in), each
ClientApp process (the message reaching the app, with the process's start time, and the reply
leaving it) and each warm site (the same around its work) append one JSON line per event to
that file: ``{"t": <unix time>, "pid": ..., "event": ..., ...}``. Every process of a loopback
federation inherits the variable from the shell that started it. One ``write`` per line on a
file opened for appending, so lines from concurrent processes do not interleave.
``benchmarks/deployment_vs_simulation.py --trace`` reads the file back into a table of where a
round's time went.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

TRACE_ENV = "FEDSPECIALISTS_TRACE"


def enabled() -> bool:
    """Whether events are written (``FEDSPECIALISTS_TRACE`` is set and not empty)."""
    return bool(os.environ.get(TRACE_ENV))


def trace(event: str, **fields: Any) -> None:
    """Append ``event`` with the current time, this process's pid and ``fields`` (JSON-able)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def process_start_time() -> float | None:
    """This process's start as unix time, from Linux ``/proc`` (to 1/100 s), or None."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # now - (seconds since boot now - seconds since boot at the start); btime is whole seconds
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events of a trace file, in time order."""
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return sorted(events, key=lambda e: e["t"])


PHASE_TYPES = {"train": "train", "evaluate": "evaluate"}  # ledger phase -> message type
APP_EVENTS = ("app_in", "app_out")
STEPS = ("to_process", "process_to_app", "site", "app", "to_server")


def phase_times(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each phase's time went, from :func:`read_events`' events.

    A phase runs from the ServerApp's ``sent`` to its next ``received`` of the same phase
    (events of no message, or no reply, are not phases: a folded run's empty evaluation).
    Per node, from its ClientApp process's ``app_in``/``app_out`` (``forwarding`` true; with no
    warm site, the process's own) and its warm site's (``forwarding`` false), in seconds:

    * ``to_process``: from sent to the ClientApp process's start (SuperLink, SuperNode and
      SuperExec passing the message on; 0 for a process that was already running);
    * ``process_to_app``: from the process's start (or sent) to the message reaching the app
      (imports, the FAB, loading the app, pulling the message);
    * ``site``: the warm site's work (0 without one);
    * ``app``: the rest of the ClientApp's time (with a site: the channel; without: the work);
    * ``to_server``: from the reply leaving the app to the phase's ``received`` (its way back,
      and the wait for the other nodes).

    The five add up to the phase's ``total`` for every node. Returns one dict per phase:
    ``phase``, ``group``, ``total`` and ``nodes`` (node id -> the five times), for nodes whose
    events are complete.
    """
    phases = []
    for i, sent in enumerate(events):
        if sent["event"] != "sent" or sent["phase"] not in PHASE_TYPES:
            continue
        if not sent.get("messages", 1):  # nothing sent (a folded evaluation): no phase
            continue
        later = events[i + 1 :]
        end = next((e for e in later if _receives(e, sent["phase"])), None)
        if end is None:
            continue
        kind = PHASE_TYPES[sent["phase"]]
        window = [
            e
            for e in events
            if sent["t"] <= e["t"] <= end["t"] and e["event"] in APP_EVENTS and e["type"] == kind
        ]
        nodes = {}
        for node in sorted({e["node"] for e in window}):
            times = node_times([e for e in window if e["node"] == node], sent["t"], end["t"])
            if times is not None:
                nodes[node] = times
        total = end["t"] - sent["t"]
        phases.append({"phase": sent["phase"], "group": sent["group"], "total": total})
        phases[-1]["nodes"] = nodes
    return phases


def _receives(event: dict[str, Any], phase: str) -> bool:
    """``event`` is the end of a ``phase`` that sent messages (one with replies counted)."""
    if event["event"] != "received" or event["phase"] != phase:
        return False
    return bool(event.get("replies", 1))


def node_times(
    events: list[dict[str, Any]], sent: float, received: float
) -> dict[str, float] | None:
    """One node's :data:`STEPS` in a phase sent at ``sent`` and received at ``received`` (unix
    times), from its app events; None if they are incomplete."""
    forwarding = [e for e in events if e["forwarding"]]
    outer = {e["event"]: e for e in (forwarding or events)}
    inner = {e["event"]: e for e in events if not e["forwarding"]} if forwarding else {}
    if set(outer) != set(APP_EVENTS):
        return None
    start = max(outer["app_in"].get("process_start") or sent, sent)
    site = inner["app_out"]["t"] - inner["app_in"]["t"] if set(inner) == set(APP_EVENTS) else 0.0
    return {
        "to_process": start - sent,
        "process_to_app": outer["app_in"]["t"] - start,
        "site": site,
        "app": outer["app_out"]["t"] - outer["app_in"]["t"] - site,
        "to_server": received - outer["app_out"]["t"],
    }
