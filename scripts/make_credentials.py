"""Make the credentials of a TLS federation with SuperNode authentication.

Writes, under OUT (default ``./credentials``): ``ca.crt``/``ca.key`` (the federation's CA),
``server.crt``/``server.key`` for the SuperLink (and ``peer<i>.crt``/``.key`` for each site's
FedMoE-DA peer endpoint), and one EC key pair per SuperNode, ``supernode<i>`` (PEM) and
``supernode<i>.pub`` (OpenSSH, for ``flwr supernode register``).

Usage::

    python scripts/make_credentials.py --out credentials --nodes 3 --hosts 127.0.0.1 localhost
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedspecialists.deploy.certs import make_ca, make_node_key, make_server_cert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("credentials"))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--hosts",
        nargs="+",
        default=["127.0.0.1", "localhost"],
        help="names / IPs the SuperLink and peer endpoints are reached by (certificate SANs)",
    )
    args = parser.parse_args()
    ca, ca_key = make_ca(args.out)
    written = [ca, *make_server_cert(args.out, "server", args.hosts, ca, ca_key)]
    for i in range(args.nodes):
        written += make_server_cert(args.out, f"peer{i}", args.hosts, ca, ca_key)
        written += make_node_key(args.out, f"supernode{i}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
