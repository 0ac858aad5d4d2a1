"""The server's send-and-collect loop: every reply collected, at most max_in_flight awaited."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

import strategies.common as common
from fedspecialists.protocol.records import content_nbytes
from strategies.common import TrafficLedger, exchange


class WindowGrid:
    """Replies to each pushed message on the second pull after it; ``silent`` nodes never do.
    Records how many messages awaited a reply at most."""

    def __init__(self, silent: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.silent = silent
        self.waiting: dict[str, tuple[Message, int]] = {}
        self.peak = 0
        self.pushes: list[int] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            mid = f"m{message.metadata.dst_node_id}-{i}"
            self.waiting[mid] = (message, 0)
            ids.append(mid)
        self.pushes.append(len(ids))
        self.peak = max(self.peak, len(self.waiting))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for mid in list(message_ids):
            message, pulls = self.waiting[mid]
            if message.metadata.dst_node_id in self.silent or pulls < 1:
                self.waiting[mid] = (message, pulls + 1)
                continue
            del self.waiting[mid]
            reply = Message(RecordDict({"r": ConfigRecord({"node": 1})}), reply_to=message)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            replies.append(reply)
        return replies


def _messages(n: int) -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        for node in range(1, n + 1)
    ]


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "REPLY_POLL_S", 0.0)


def test_without_a_window_every_message_is_sent_at_once() -> None:
    grid = WindowGrid()
    replies = exchange(grid, _messages(7), timeout=5)
    assert len(replies) == 7 and grid.pushes == [7] and grid.peak == 7


def test_a_window_keeps_at_most_that_many_waiting_and_collects_every_reply() -> None:
    grid = WindowGrid()
    replies = exchange(grid, _messages(10), timeout=5, max_in_flight=3)
    assert len(replies) == 10 and grid.peak == 3
    assert sum(grid.pushes) == 10 and grid.pushes[0] == 3


def test_a_node_that_never_replies_holds_one_place_and_the_rest_go_on() -> None:
    grid = WindowGrid(silent={2})
    replies = exchange(grid, _messages(6), timeout=0.5, max_in_flight=2)
    assert sorted(r.metadata.reply_to_message_id.split("-")[0] for r in replies) == [
        "m1",
        "m3",
        "m4",
        "m5",
        "m6",
    ]
    assert grid.peak == 2


def test_messages_left_when_the_time_runs_out_are_handed_back_and_uncounted() -> None:
    # Nodes 1 and 2 never reply and fill a window of 2: nodes 3-5 are never sent.
    grid = WindowGrid(silent={1, 2})
    messages = [
        Message(
            RecordDict({"x": ConfigRecord({"pad": "a" * 100 * node})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN if node % 2 else MessageType.EVALUATE,
        )
        for node in range(1, 6)
    ]
    ledger = TrafficLedger()
    ledger.count_messages("train", messages[0::2])
    ledger.count_messages("evaluate", messages[1::2])
    unsent: list[Message] = []

    def take_back(left: list[Message]) -> None:
        unsent.extend(left)
        ledger.uncount_unsent(left)

    replies = exchange(grid, messages, timeout=0.2, max_in_flight=2, on_unsent=take_back)
    assert replies == [] and sum(grid.pushes) == 2
    assert [m.metadata.dst_node_id for m in unsent] == [3, 4, 5]
    # What stays counted is what went out: node 1's training and node 2's evaluation message.
    assert ledger.round_bytes[("train", "down")] == {1: content_nbytes(messages[0].content)}
    assert ledger.round_bytes[("evaluate", "down")][2] == content_nbytes(messages[1].content)
    assert ledger.total_bytes[("train", "down")] == content_nbytes(messages[0].content)
    assert ledger.total_bytes[("evaluate", "down")] == content_nbytes(messages[1].content)
    assert all(ledger.per_node_total[n]["down"] == 0 for n in (3, 4, 5))
