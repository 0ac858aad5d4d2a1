"""The timing trace: events written only when asked for, and a phase's time split by hand."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from fedspecialists.trace import (
    TRACE_ENV,
    node_times,
    phase_times,
    process_start_time,
    read_events,
    trace,
)


def test_nothing_is_written_unless_the_variable_names_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRACE_ENV, raising=False)
    trace("sent", phase="train")
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(path))
    before = time.time()
    trace("sent", phase="train", group="1")
    trace("received", phase="train", group="1")
    events = read_events(path)
    assert [e["event"] for e in events] == ["sent", "received"]
    assert all(e["pid"] == os.getpid() and before <= e["t"] <= time.time() for e in events)
    assert events[0]["phase"] == "train" and events[0]["group"] == "1"


def test_this_process_started_before_now() -> None:
    start = process_start_time()
    assert start is not None and 0 < time.time() - start < 24 * 3600


def _app(event: str, t: float, node: int, forwarding: bool, **extra: Any) -> dict[str, Any]:
    return {
        "event": event,
        "t": t,
        "node": node,
        "type": "train",
        "forwarding": forwarding,
        **extra,
    }


def test_a_warm_phase_split_by_hand() -> None:
    # sent at 100; node 1's ClientApp process starts at 101.5, gets the message at 102.0, the
    # site works 102.2 -> 104.2, the reply leaves at 104.5; received at 106.
    events = [
        {"event": "sent", "t": 100.0, "phase": "train", "group": "1"},
        _app("app_in", 102.0, 1, True, process_start=101.5),
        _app("app_in", 102.2, 1, False, process_start=50.0),
        _app("app_out", 104.2, 1, False),
        _app("app_out", 104.5, 1, True),
        {"event": "received", "t": 106.0, "phase": "train", "group": "1"},
    ]
    [phase] = phase_times(events)
    assert phase["phase"] == "train" and phase["group"] == "1"
    assert phase["total"] == pytest.approx(6.0)
    times = phase["nodes"][1]
    expected = {"to_process": 1.5, "process_to_app": 0.5, "site": 2.0, "app": 0.5, "to_server": 1.5}
    assert times == pytest.approx(expected)
    assert sum(times.values()) == pytest.approx(phase["total"])


def test_a_process_already_running_and_a_node_without_a_site() -> None:
    # Simulation's actors started long before the phase; with no site the app does the work.
    events = [
        _app("app_in", 10.5, 7, False, process_start=1.0),
        _app("app_out", 12.0, 7, False),
    ]
    times = node_times(events, sent=10.0, received=12.25)
    assert times == pytest.approx(
        {"to_process": 0.0, "process_to_app": 0.5, "site": 0.0, "app": 1.5, "to_server": 0.25}
    )
    assert node_times(events[:1], sent=10.0, received=12.25) is None  # no reply: incomplete


def test_a_phase_without_its_received_event_is_left_out() -> None:
    events = [{"event": "sent", "t": 1.0, "phase": "train", "group": "3"}]
    assert phase_times(events) == []


def test_the_clientapp_mod_times_a_message_and_passes_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import Context, Message, MessageType, RecordDict

    from client_app.warm import trace_mod

    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN, group_id="2")
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    reply = Message(RecordDict(), reply_to=msg)
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(path))
    assert trace_mod(msg, context, lambda m, c: reply) is reply
    events = read_events(path)
    assert [e["event"] for e in events] == ["app_in", "app_out"]
    for e in events:
        assert (e["node"], e["type"], e["group"], e["forwarding"]) == (5, "train", "2", False)
    assert events[0]["process_start"] <= events[0]["t"]
    monkeypatch.delenv(TRACE_ENV)
    assert trace_mod(msg, context, lambda m, c: reply) is reply
    assert len(read_events(path)) == 2  # off: nothing more written


def test_a_phase_that_sent_nothing_is_no_phase() -> None:
    # A folded run's evaluation: nothing sent, nothing received; then a real training phase.
    events = [
        {"event": "sent", "t": 1.0, "phase": "evaluate", "group": "", "messages": 0},
        {"event": "received", "t": 1.1, "phase": "evaluate", "group": "", "replies": 0},
        {"event": "sent", "t": 2.0, "phase": "train", "group": "", "messages": 1},
        _app("app_in", 2.5, 4, False, process_start=2.2),
        _app("app_out", 3.0, 4, False),
        {"event": "received", "t": 3.5, "phase": "train", "group": "", "replies": 1},
    ]
    [phase] = phase_times(events)
    assert phase["phase"] == "train" and phase["total"] == pytest.approx(1.5)
    assert phase["nodes"][4] == pytest.approx(
        {"to_process": 0.2, "process_to_app": 0.3, "site": 0.0, "app": 0.5, "to_server": 0.5}
    )
