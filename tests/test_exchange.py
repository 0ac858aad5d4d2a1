"""The server's send-and-collect loop: every reply collected, at most max_in_flight awaited."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

import strategies.common as common
from strategies.common import exchange


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
