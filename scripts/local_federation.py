"""Try a real deployment on this machine: a TLS SuperLink with SuperNode authentication, N
SuperNodes (registered keys, node config with partition, store and peer endpoint) and a FedMoE-DA
peer endpoint per site. It prints how to submit runs, and stops everything (by PID) on Ctrl-C.

Usage::

    python scripts/local_federation.py --home /tmp/fed --nodes 3
    # in another shell, with the printed FLWR_HOME:
    FLWR_HOME=/tmp/fed/flwr-home flwr run . fedspecialists-local --stream \
        --run-config 'overrides="federation.num_clients=3 method=fedmoe_da"'

With ``--data-root DIR`` (folders ``DIR/site<i>``, e.g. from ``scripts/export_site_data.py``)
each site reads its own files (node config ``data-dir``); run with ``suite=site_images``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from fedspecialists.deploy.federation import CONNECTION, local_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("local-federation"))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--data-root", type=Path, help="sites' own files: DIR/site0, DIR/site1 ...")
    parser.add_argument(
        "--warm-sites",
        action="store_true",
        help="a warm site (fedspecialists-site) per SuperNode: its ClientApps forward to it",
    )
    parser.add_argument(
        "--prefork",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SuperNodes fork each ClientApp from a process that imported Flower once "
        "(default; --no-prefork: Flower starts a fresh process per message)",
    )
    args = parser.parse_args()
    data_dirs = [args.data_root / f"site{i}" for i in range(args.nodes)] if args.data_root else None
    suite = " suite=site_images" if data_dirs else ""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with local_federation(
        args.home,
        num_sites=args.nodes,
        data_dirs=data_dirs,
        warm_sites=args.warm_sites,
        prefork=args.prefork,
    ) as fed:
        fed.wait_for_nodes(args.nodes)
        print(
            f"SuperLink (TLS, node auth) on {fed.control_address}; {args.nodes} SuperNodes online"
        )
        for site in fed.sites:
            print(
                f"  site {site.index}: store {site.store}, peer endpoint 127.0.0.1:{site.peer_port}"
                + (f", warm site {site.warm_socket}" if site.warm is not None else "")
            )
        print(f"credentials in {fed.credentials}; logs in {fed.home}")
        print(
            f"\nexport FLWR_HOME={fed.env['FLWR_HOME']}\n"
            "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\n"
            f"flwr run . {CONNECTION} --stream --run-config "
            f"'overrides=\"federation.num_clients={args.nodes} method=fedmoe_da{suite}\"'\n"
            "\nCtrl-C stops every process started here."
        )
        stop.wait()


if __name__ == "__main__":
    main()
