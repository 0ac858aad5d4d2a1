"""Network peer transport for FedMoE-DA deployments: a gRPC expert endpoint per SuperNode site.

Each site runs :class:`PeerEndpoint` next to its SuperNode. It serves the experts its ClientApp
publishes into the site's store folder (the same layout as :class:`~fedspecialists.peer.exchange.
LocalPeerStore`: ``experts/<sha256>.safetensors`` and the server key in ``grant_key``).
:class:`GrpcPeerTransport` is what the ClientApp uses there: it publishes into the local folder
and fetches peers' experts from their endpoints.

* One unary method, ``/fedspecialists.peer.exchange.v1.ExpertStore/Fetch``: request = JSON
  ``{"sha256", "grant", "requester"}``, response = the expert's safetensors bytes. Built on
  grpcio (which Flower already depends on) with generic handlers, so no generated code.
* TLS when the endpoint is given a certificate and key (clients pass the CA's certificate).
* The endpoint serves an expert only to a request carrying a grant the server signed for that
  requester and for the round the site serves, and that has not expired
  (:func:`~fedspecialists.peer.exchange.authorise`); it refuses a name that is not a SHA-256
  digest and payloads over its size limit. The client enforces its own limit, a timeout, and
  checks the bytes against the owner's reported hash before anything is used (or counted).

Run an endpoint: ``fedspecialists-peer --store DIR --port 9300 [--certfile --keyfile]``.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from fedspecialists.peer.exchange import (
    ExpertRef,
    LocalPeerStore,
    PeerFetchError,
    authorise,
    expert_from_bytes,
    is_sha256_hex,
    read_at_most,
    sha256,
)

SERVICE = "fedspecialists.peer.exchange.v1.ExpertStore"
FETCH = f"/{SERVICE}/Fetch"


def _identity(data: bytes) -> bytes:
    return data


class PeerEndpoint:
    """A gRPC server that serves one site's published experts to authorised peers.

    Parameters
    ----------
    store : str | Path
        The site's store folder (what its ClientApp publishes into).
    address : str
        ``host:port`` to listen on (port 0 = any free port; see :attr:`port`).
    certfile, keyfile : Path | None
        Server certificate and key (PEM) for TLS; both or neither.
    max_bytes : int
        Largest expert served.
    """

    def __init__(
        self,
        store: str | Path,
        address: str = "127.0.0.1:0",
        certfile: Path | None = None,
        keyfile: Path | None = None,
        max_bytes: int = 16_000_000,
    ) -> None:
        self.store = Path(store)
        self.max_bytes = max_bytes
        self.served_bytes = 0
        self.refused: list[str] = []
        self._lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Fetch": grpc.unary_unary_rpc_method_handler(
                    self._fetch, request_deserializer=_identity, response_serializer=_identity
                )
            },
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_send_message_length", max_bytes + 1024)],
        )
        self.server.add_generic_rpc_handlers((handler,))
        if certfile is not None and keyfile is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(keyfile).read_bytes(), Path(certfile).read_bytes())]
            )
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        self.tls = certfile is not None

    def start(self) -> PeerEndpoint:
        self.server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> bytes:
        with self._lock:
            self.refused.append(reason)
        context.abort(code, reason)
        return b""  # not reached: abort raises

    def _fetch(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            query = json.loads(request)
            digest, grant, requester = (
                str(query["sha256"]),
                query.get("grant"),
                int(query["requester"]),
            )
        except (ValueError, KeyError, TypeError):
            return self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        key_file = self.store / "grant_key"
        if not key_file.exists():
            return self._refuse(
                context, grpc.StatusCode.UNAVAILABLE, "this site has not joined a round yet"
            )
        try:
            authorise(self.store, grant, requester)
        except PeerFetchError as exc:
            return self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if not is_sha256_hex(digest):
            return self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "not a SHA-256 digest")
        path = self.store / "experts" / f"{digest}.safetensors"
        if not path.exists():
            return self._refuse(context, grpc.StatusCode.NOT_FOUND, f"no expert {digest[:12]}")
        data = read_at_most(path, self.max_bytes)
        if data is None:
            return self._refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"expert over {self.max_bytes} bytes"
            )
        with self._lock:
            self.served_bytes += len(data)
        return data


class GrpcPeerTransport:
    """The ClientApp's side in a deployment: publish locally, fetch from peers' endpoints.

    Parameters
    ----------
    store : str | Path
        This site's store folder (served by this site's :class:`PeerEndpoint`).
    address : str
        This site's endpoint as peers reach it (``host:port``), reported to the server.
    root_certificates : Path | None
        CA certificate (PEM) to verify peers' endpoints; None = plaintext.
    max_bytes, timeout_s
        Largest expert accepted and the deadline of one fetch.
    """

    def __init__(
        self,
        store: str | Path,
        address: str,
        root_certificates: Path | None = None,
        max_bytes: int = 16_000_000,
        timeout_s: float = 10.0,
    ) -> None:
        self.local = LocalPeerStore(store, max_bytes)
        self.address = address
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.bytes_fetched = 0
        self._credentials = (
            grpc.ssl_channel_credentials(Path(root_certificates).read_bytes())
            if root_certificates is not None
            else None
        )

    def trust(self, public_key_hex: str, server_round: int | None = None) -> None:
        self.local.trust(public_key_hex, server_round)

    def publish(
        self, server_round: int, experts: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, str]:
        return self.local.publish(server_round, experts)

    def fetch(self, ref: ExpertRef, grant: str | None, requester: int) -> dict[str, np.ndarray]:
        options = [("grpc.max_receive_message_length", self.max_bytes)]
        channel = (
            grpc.secure_channel(ref.address, self._credentials, options=options)
            if self._credentials is not None
            else grpc.insecure_channel(ref.address, options=options)
        )
        request = json.dumps({"sha256": ref.sha256, "grant": grant, "requester": requester})
        try:
            with channel:
                call = channel.unary_unary(
                    FETCH, request_serializer=_identity, response_deserializer=_identity
                )
                data = call(request.encode(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise PeerFetchError(
                f"peer {ref.owner} at {ref.address} refused or unreachable: "
                f"{getattr(code, 'name', code)}: {details}"
            ) from exc
        if sha256(data) != ref.sha256:
            raise PeerFetchError(f"expert {ref.expert_id}: content does not match its owner's hash")
        self.bytes_fetched += len(data)  # only verified bytes count
        try:
            return expert_from_bytes(data)
        except Exception as exc:
            raise PeerFetchError(f"expert {ref.expert_id}: unreadable ({exc!r})") from exc


def main(argv: list[str] | None = None) -> None:
    """``fedspecialists-peer``: serve a site's experts until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description="FedMoE-DA peer endpoint (gRPC)")
    parser.add_argument("--store", type=Path, required=True, help="the site's store folder")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--certfile", type=Path)
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--max-bytes", type=int, default=16_000_000)
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    args.store.mkdir(parents=True, exist_ok=True)
    endpoint = PeerEndpoint(
        args.store, f"{args.host}:{args.port}", args.certfile, args.keyfile, args.max_bytes
    ).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"peer endpoint serving {args.store} on {args.host}:{endpoint.port} "
        f"({'TLS' if endpoint.tls else 'plaintext'})",
        flush=True,
    )
    stop.wait()
    endpoint.stop()


if __name__ == "__main__":
    main()
