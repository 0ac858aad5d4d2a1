"""A warm site: one long-lived process per site, next to its SuperNode, that runs the ClientApp.

Flower starts a fresh ``flwr-clientapp`` process for every message; each one imports torch,
builds its model and loads and encodes its data again. With a warm site, that process only
forwards (:mod:`client_app.warm`): it sends the message and its context over the site's local
channel (:mod:`fedspecialists.site.channel`), the site runs the very same ClientApp (mods and
all) in-process, where torch, the tokenizer and the encoded data stay loaded between messages,
and answers with the reply and the context's new state. The SuperNode keeps owning the state:
the site holds caches only, so a site that dies mid-message loses nothing (that message fails,
as a crashing ClientApp's would, and the next one starts cold or from a restarted site).

Run it as ``fedspecialists-site --socket <path> --secret-file <path>`` (the secret file is
created if missing; ``--check`` asks a running site whether it is healthy) and give the
SuperNode the node config ``warm-site="<socket path>"`` and ``warm-site-secret="<secret file>"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.supercore.task_identity import TaskIdentity

from fedspecialists.site.channel import (
    call,
    listen,
    pack,
    read_secret,
    serve_one,
    unpack,
    write_secret,
)

SOCKET_KEY = "warm-site"  # node config: the site's socket path
SECRET_KEY = "warm-site-secret"  # node config: the site's secret file
_MESSAGE, _REPLY, _ERROR, _PING, _PONG = b"message", b"reply", b"error", b"ping", b"pong"

logger = logging.getLogger("fedspecialists.site")


# -- what travels over the channel -------------------------------------------------------------
def encode_request(msg: Message, context: Context) -> bytes:
    """The message, its context and this process's task identity, as one request."""
    identity = {
        "task_id": TaskIdentity.task_id,
        "run_id": TaskIdentity.run_id,
        "node_id": TaskIdentity.node_id,
    }
    return pack(
        [
            _MESSAGE,
            json.dumps(identity).encode(),
            message_to_proto(msg).SerializeToString(),
            context_to_proto(context).SerializeToString(),
        ]
    )


def decode_request(request: bytes) -> tuple[dict[str, int], Message, Context]:
    """The inverse of :func:`encode_request`; ``ValueError`` if it is not one."""
    parts = unpack(request)
    if len(parts) != 4 or parts[0] != _MESSAGE:
        raise ValueError("not a warm-site request")
    identity = {k: int(v) for k, v in json.loads(parts[1]).items()}
    message = message_from_proto(ProtoMessage.FromString(parts[2]))
    context = context_from_proto(ProtoContext.FromString(parts[3]))
    return identity, message, context


def encode_reply(reply: Message, state: RecordDict) -> bytes:
    return pack([_REPLY, message_to_proto(reply).SerializeToString(), _state_bytes(state)])


def _state_bytes(state: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(state).SerializeToString())


def encode_error(text: str) -> bytes:
    return pack([_ERROR, text.encode()])


def decode_response(response: bytes) -> tuple[Message, RecordDict]:
    """The reply and the context's new state; ``RuntimeError`` with the site's reason if the
    ClientApp raised there (as it would have here)."""
    parts = unpack(response)
    if parts and parts[0] == _ERROR and len(parts) == 2:
        raise RuntimeError(f"on the warm site: {parts[1].decode(errors='replace')}")
    if len(parts) != 3 or parts[0] != _REPLY:
        raise RuntimeError("the warm site sent a malformed response")
    reply = message_from_proto(ProtoMessage.FromString(parts[1]))
    return reply, recorddict_from_proto(ProtoRecordDict.FromString(parts[2]))


# -- the site -----------------------------------------------------------------------------------
def handle(request: bytes, app: Any) -> bytes:
    """Run ``app`` (a Flower ClientApp) on one forwarded message; its reply and new state.
    A health check (``ping``) gets ``pong``."""
    if unpack(request) == [_PING]:
        return pack([_PONG])
    try:
        identity, message, context = decode_request(request)
    except (ValueError, TypeError) as exc:  # protobuf's DecodeError is a ValueError
        return encode_error(f"malformed request: {exc}")
    TaskIdentity.task_id = identity["task_id"]
    TaskIdentity.run_id = identity["run_id"]
    TaskIdentity.node_id = identity["node_id"]
    # Here the work is done, not forwarded again.
    context.node_config = {k: v for k, v in context.node_config.items() if k != SOCKET_KEY}
    started = time.time()
    try:
        reply = app(message, context)
    except Exception as exc:  # the ClientApp's own failure: the forwarder raises it there
        logger.warning("message %s failed: %s", message.metadata.message_type, exc)
        return encode_error(f"{type(exc).__name__}: {exc}")
    kind, seconds = message.metadata.message_type, time.time() - started
    logger.info("%s of run %s in %.2fs", kind, context.run_id, seconds)
    return encode_reply(reply, context.state)


def serve(socket_path: Path, secret_file: Path, max_messages: int | None = None) -> None:
    """Answer forwarded messages, one at a time, until stopped (SIGTERM or SIGINT)."""
    from client_app.app import app  # the ClientApp itself; imports torch on first use

    secret = read_secret(secret_file) if secret_file.exists() else write_secret(secret_file)
    server = listen(socket_path)
    logger.info("warm site listening on %s", socket_path)
    served = 0
    try:
        while max_messages is None or served < max_messages:
            refused = serve_one(server, secret, lambda request: handle(request, app))
            if refused is not None:
                logger.warning("connection refused: %s", refused)
            served += 1
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def healthy(socket_path: Path, secret_file: Path, timeout: float = 10) -> bool:
    """Whether a site answers at ``socket_path`` (admitting this user and secret)."""
    try:
        response = call(socket_path, read_secret(secret_file), pack([_PING]), timeout=timeout)
    except OSError:
        return False
    return unpack(response) == [_PONG]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="the channel's socket path")
    parser.add_argument(
        "--secret-file", type=Path, required=True, help="the site's secret (made if missing)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 0 if a site answers there, else 1; serve nothing"
    )
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if healthy(args.socket, args.secret_file) else 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the socket file is removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    serve(args.socket, args.secret_file)


if __name__ == "__main__":
    main()
