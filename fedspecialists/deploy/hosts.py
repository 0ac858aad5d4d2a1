"""Where the processes of a local federation run: loopback, or hosts of their own.

A :class:`Host` is an address the others reach it at and the command prefix that runs a
process there. On loopback every process shares ``127.0.0.1``. :func:`network_namespaces` makes
real separate hosts on one Linux machine: each one a network namespace with its own interface
and address on a private bridge (the machine itself reaches them through the bridge), so that
the SuperLink, the SuperNodes, their peer endpoints and warm sites talk over a network, not
loopback. Making them needs root (``CAP_NET_ADMIN``); they are removed on exit.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """A place to run processes: its address, and how to run a command there."""

    address: str
    prefix: tuple[str, ...] = ()
    name: str = "loopback"

    def command(self, command: list[str]) -> list[str]:
        return [*self.prefix, *command]


LOOPBACK = Host("127.0.0.1")


class NamespacesUnavailableError(RuntimeError):
    """Network namespaces cannot be made here (the reason is the message)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespacesUnavailableError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


@contextmanager
def network_namespaces(count: int) -> Iterator[list[Host]]:
    """``count`` hosts, each a network namespace with its own address on a new bridge.

    Names carry this process's id (so that concurrent runs do not collide); interfaces and
    namespaces are deleted on exit, also after a failure half-way.
    """
    if os.geteuid() != 0:
        raise NamespacesUnavailableError("making network namespaces needs root (CAP_NET_ADMIN)")
    if count > 250:
        raise ValueError("at most 250 hosts on one bridge")
    tag = f"fs{os.getpid() % 100000}"
    # 198.18.0.0/15 is reserved for benchmarking (RFC 2544): no real network it could shadow.
    subnet = f"198.{random.randint(18, 19)}.{random.randint(0, 255)}"
    bridge, made = f"{tag}b", []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for i in range(count):
            ns, outside, inside = f"{tag}n{i}", f"{tag}h{i}", f"{tag}c{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            for args in (
                ("addr", "add", f"{subnet}.{i + 1}/24", "dev", inside),
                ("link", "set", inside, "up"),
                ("link", "set", "lo", "up"),
            ):
                _ip("netns", "exec", ns, "ip", *args)
            hosts.append(Host(f"{subnet}.{i + 1}", ("ip", "netns", "exec", ns), ns))
        yield hosts
    finally:
        for ns in made:  # takes its end of the veth pair with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
