"""Fixtures shared by the strategy tests, which drive strategies with hand-made messages."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedspecialists.protocol.packing import unpack_content


def as_received(messages: Iterable[Message]) -> list[Message]:
    """``messages`` as a ClientApp's handlers see them: their packed ArrayRecords unpacked
    (``federation.pack_arrays``; the ClientApp's ``packing_mod`` does this), in place."""
    out = list(messages)
    for message in out:
        message.content = unpack_content(message.content)
    return out


class FakeGrid:
    """The part of Flower's ``Grid`` a strategy's ``configure_*`` calls: the connected nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages built outside Flower's runtime need a task identity.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
