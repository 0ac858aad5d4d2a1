"""How long a forked ClientApp takes to create its Runtime API client and to load the app,
with and without the fork server's pre-imported libraries
(``fedspecialists.deploy.superexec.PREIMPORTED``).

The fork server of ``fedspecialists-superexec`` imports Flower's ClientApp runtime once and
forks one child per message; each child creates the HTTP client it pulls its message with
(Flower's ``RuntimeHttpClient``, as ``run_clientapp`` does; no request is sent) and loads the
app (``client_app.app``) itself. This script does the same in two fresh processes, one
importing only Flower's runtime before it forks, one also importing the pre-imported
libraries, and times both steps in each of ``--forks`` children. Run it alone: the figures are
CPU time on a shared machine otherwise.

Usage::

    python benchmarks/fork_app_load.py --forks 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, time
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # what the fork server imports
if sys.argv[1] == "preimport":
    from fedspecialists.deploy.superexec import preimport
    preimport()
times = []
for _ in range(int(sys.argv[2])):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked ClientApp: its Runtime API client, then the app, as Flower's
        from flwr.supernode.runtime.run_clientapp import RuntimeHttpClient
        start = time.perf_counter()
        RuntimeHttpClient.from_server_address("127.0.0.1:9", True, None, [])
        made = time.perf_counter()
        import client_app.app  # noqa: F401
        os.write(write, json.dumps([made - start, time.perf_counter() - made]).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    times.append(json.loads(os.read(read, 256)))
print(json.dumps(times))
"""


def load_times(mode: str, forks: int) -> list[list[float]]:
    """Seconds each of ``forks`` children took to create its Runtime API client and to import
    the app (``mode``: ``flower`` or ``preimport``), from one fresh parent process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(forks)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [[float(t) for t in pair] for pair in json.loads(out.stdout.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=10)
    args = parser.parse_args()
    print(
        "| fork server imported | children | Runtime API client, median (min-max) (s) "
        "| app load, median (min-max) (s) |"
    )
    print("|---|---|---|---|")
    for mode, label in (("flower", "Flower's runtime"), ("preimport", "+ PREIMPORTED")):
        times = load_times(mode, args.forks)
        cells = [_cell([t[i] for t in times]) for i in (0, 1)]
        print(f"| {label} | {len(times)} | {cells[0]} | {cells[1]} |")


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
