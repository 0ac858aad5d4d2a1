"""Both methods at 10, 100 and 1,000 simulated clients: time per round, peak memory, server time.

Each size runs the ready 1,000-client experiment (``+experiment=fltac_1000`` /
``fedmoe_da_1000``) with ``federation.num_clients`` set to the size and as many clients per
round as the 1,000-client one samples (50; all of them at 10 clients). While a run goes, every
process under the SuperLink is sampled every 0.5 s: the peak resident memory of the process
that runs the ServerApp (``flwr-simulation``) and of the largest ClientApp worker (Ray's
``ClientAppActor``). The table reads each run's ``metrics.jsonl`` (``round_time_s``,
``aggregate_s``, the pool and the slots the server keeps).

Usage::

    python benchmarks/scale.py --out runs/scale --sizes 10 100 1000 --methods fltac fedmoe_da
    python benchmarks/scale.py --out runs/scale --table-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from fedspecialists.run.local import local_superlink, run_app

PER_ROUND = 50  # clients sampled per round at 1,000 (fraction 0.05)


def overrides(method: str, clients: int, out: Path, name: str) -> str:
    fraction = min(1.0, PER_ROUND / clients)
    return (
        f"+experiment={method}_1000 federation.num_clients={clients} "
        f"federation.fraction_train={fraction} output.root={out} output.name={name}"
    )


class MemorySampler(threading.Thread):
    """Peak RSS (MB) of every process under ``root``, by command line, sampled every 0.5 s."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peaks, self.stop = root, dict[str, float](), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                processes = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    key = f"{process.pid} {' '.join(process.cmdline())[:100]}"
                    rss = process.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.peaks[key] = max(self.peaks.get(key, 0.0), rss)

    def peak(self, marker: str) -> float | None:
        found = [mb for key, mb in self.peaks.items() if marker in key]
        return max(found) if found else None


def run_size(link: Any, method: str, clients: int, out: Path) -> dict[str, Any]:
    name = f"{method}-{clients}"
    sampler = MemorySampler(link.process.pid)
    sampler.start()
    started = time.time()
    outcome = run_app(
        link, overrides(method, clients, out, name), num_supernodes=clients, timeout_s=4 * 3600
    )
    sampler.stop.set()
    sampler.join()
    metrics = out / name / "metrics.jsonl"
    rounds = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    row = {
        "method": method,
        "clients": clients,
        "per_round": min(clients, PER_ROUND),
        "status": outcome.status,
        "wall_s": time.time() - started,
        "round_s": [r.get("round_time_s") for r in rounds],
        "aggregate_s": [r.get("aggregate_s") for r in rounds],
        "serverapp_mb": sampler.peak("flwr-simulation"),
        "clientapp_mb": sampler.peak("ClientAppActor"),
        "pool_clients": rounds[-1].get("pool", {}).get("clients") if rounds else None,
        "replies_ok": [r.get("replies_ok") for r in rounds],
        "peaks": sampler.peaks,
    }
    (out / f"{name}.log").write_text(outcome.log)
    print(json.dumps({k: v for k, v in row.items() if k != "peaks"}), flush=True)
    return row


def checkpoint_mb(run: Path) -> float | None:
    """The size of the server's state on disk after the last round (``checkpoint/``), MB."""
    files = list((run / "checkpoint").glob("*"))
    return sum(f.stat().st_size for f in files) / 1e6 if files else None


def table(rows: list[dict[str, Any]], out: Path) -> str:
    lines = [
        "| method | clients | per round | status | s per round (2 to n-1) | last round, "
        "evaluating every client, s | server "
        "aggregation s (max) | ServerApp peak MB | one ClientApp peak MB | server state "
        "(checkpoint) MB | clients in the pool |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        state = checkpoint_mb(out / f"{r['method']}-{r['clients']}")
        # Round 1 builds the models and the data; the last also evaluates every client.
        later = [t for t in r["round_s"][1:-1] if t is not None]
        agg = [t for t in r["aggregate_s"] if t is not None]
        cells = [
            r["method"],
            str(r["clients"]),
            str(r["per_round"]),
            r["status"],
            f"{statistics.mean(later):.1f}" if later else "n/a",
            f"{r['round_s'][-1]:.1f}" if r["round_s"] and r["round_s"][-1] else "n/a",
            f"{max(agg):.2f}" if agg else "n/a",
            f"{r['serverapp_mb']:.0f}" if r["serverapp_mb"] else "n/a",
            f"{r['clientapp_mb']:.0f}" if r["clientapp_mb"] else "n/a",
            f"{state:.1f}" if state is not None else "n/a",
            str(r["pool_clients"]) if r["pool_clients"] is not None else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=["fltac", "fedmoe_da"])
    parser.add_argument("--table-only", action="store_true", help="the table of --out's runs")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.table_only:
        print(table(json.loads((out / "scale.json").read_text()), out))
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with local_superlink(out / "flwr-home") as link:
        for method in args.methods:
            for clients in args.sizes:
                rows.append(run_size(link, method, clients, out))
                (out / "scale.json").write_text(json.dumps(rows, indent=2))
    text = table(rows, out)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
