"""The ClientApp's side of ``federation.pack_arrays``: packed records in, packed records out.

Inside the warm site's forwarder (the site runs it, so the forwarder only passes bytes on) and
outside everything that reads or changes arrays (a folded evaluation, faults, local DP), so
each of those sees the records as the method built them.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client_app.node import config_for
from fedspecialists.protocol.packing import pack_content, unpack_content


def packing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack ``msg``'s packed ArrayRecords; pack the reply's when the run packs.

    A record that cannot be unpacked raises :class:`~fedspecialists.protocol.values.
    ProtocolError` (Flower sends the error back as the reply).
    """
    if not msg.has_error():
        msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    cfg = config_for(str(context.run_config.get("overrides", "")))
    if cfg.federation.pack_arrays and not reply.has_error():
        reply.content = pack_content(reply.content)
    return reply
