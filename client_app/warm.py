"""The forwarder: with a warm site (node config ``warm-site``), this ClientApp process only
passes each message to it (see :mod:`fedspecialists.site.warm`); without one, or while none
listens there, it does the work itself."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from fedspecialists import trace
from fedspecialists.site.channel import ChannelRefusedError, call, read_secret
from fedspecialists.site.warm import SECRET_KEY, SOCKET_KEY, decode_response, encode_request


def trace_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """With ``FEDSPECIALISTS_TRACE`` set (:mod:`fedspecialists.trace`), the times a message
    reaches this app and its reply leaves it, and when this process started; otherwise
    nothing. On a warm site the same app runs again, so the site's own times come too
    (``forwarding`` false there)."""
    if not trace.enabled():
        return call_next(msg, context)
    fields = {
        "node": context.node_id,
        "type": msg.metadata.message_type,
        "group": msg.metadata.group_id,
        "forwarding": bool(context.node_config.get(SOCKET_KEY)),
    }
    trace.trace("app_in", process_start=trace.process_start_time(), **fields)
    try:
        return call_next(msg, context)
    finally:
        trace.trace("app_out", **fields)


def warm_site_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Forward ``msg`` to the site's warm process, or run it here when there is none.

    The context's state changes only when the site's whole reply has arrived: a site that dies
    mid-message fails that message (``RuntimeError``, an error reply) and applies nothing.
    """
    socket_path = context.node_config.get(SOCKET_KEY)
    if not socket_path:
        return call_next(msg, context)
    path = Path(str(socket_path))
    secret_file = Path(str(context.node_config.get(SECRET_KEY) or path.with_suffix(".secret")))
    try:
        response = call(path, read_secret(secret_file), encode_request(msg, context))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        log(INFO, "no warm site at %s (%s): the work is done here", path, type(exc).__name__)
        return call_next(msg, context)
    except ChannelRefusedError as exc:  # a wrong secret or user: a setup error, said as such
        raise RuntimeError(f"the warm site at {path} refused this ClientApp: {exc}") from exc
    except ConnectionError as exc:
        raise RuntimeError(f"the warm site at {path} failed mid-message: {exc}") from exc
    reply, state = decode_response(response)
    context.state = state
    return reply
