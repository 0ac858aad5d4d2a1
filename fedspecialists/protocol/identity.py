"""Every method's first exchange with a node it has not met: which client it is.

Flower draws node ids anew for every federation (a restarted simulation, a SuperNode that
reconnects), so a run that is resumed meets its clients under new ids. The strategies keep what
they know of a client, and order its replies, by a *client id* that stays: the node config's
``client-id`` where a deployment sets one, else its ``partition-id``, else the node id.

Content of each message::

    IdentityQuery  config "identify": server-round
    IdentityReply  config "identity": client-id
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedspecialists.protocol.values import ProtocolError

QUERY, REPLY = "identify", "identity"


@dataclass
class IdentityQuery:
    """Server -> node: tell me your client id."""

    server_round: int

    def to_record(self) -> RecordDict:
        return RecordDict({QUERY: ConfigRecord({"server-round": self.server_round})})

    @staticmethod
    def is_query(content: RecordDict) -> bool:
        return QUERY in content.config_records


@dataclass
class IdentityReply:
    """Node -> server: its client id (>= 0)."""

    client_id: int

    def to_record(self) -> RecordDict:
        return RecordDict({REPLY: ConfigRecord({"client-id": self.client_id})})

    @classmethod
    def from_record(cls, content: RecordDict) -> IdentityReply:
        record = content.config_records.get(REPLY)
        value = None if record is None else record.get("client-id")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"no valid 'client-id' in the identity reply ({value!r})")
        return cls(int(value))
