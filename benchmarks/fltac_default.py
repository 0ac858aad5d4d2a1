"""The FL-TAC default table: the embedded default benchmark, every method, several seeds.

Each run is a real ``flwr run`` of the app on a local simulation SuperLink (10 SuperNodes),
started and stopped by this script; the table is built from the runs' ``summary.json`` files.

Usage::

    python benchmarks/fltac_default.py --out runs/fltac_default --seeds 0 1 2
    python benchmarks/fltac_default.py --out runs/fltac_default --table-only   # rebuild table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runner import fmt as _fmt
from runner import run_all

METHODS = {
    "fltac": "FL-TAC (rank 1 per task)",
    "fedit": "FedIT (rank 16)",
    "oracle": "Oracle clustering (rank 1 per task)",
    "local": "Local only (rank 1 per task)",
}


def table(out: Path, methods: list[str]) -> str:
    summaries: dict[str, list[dict]] = {m: [] for m in methods}
    for path in sorted(out.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if summary["method"] in summaries:
            summaries[summary["method"]].append(summary)
    tasks = sorted({t for runs in summaries.values() for r in runs for t in r["per_task_accuracy"]})
    head = ["method", *tasks, "mean", "bytes up+down (MB)", "s / round", "ARI rounds 2+", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        runs = summaries[method]
        if not runs:
            continue
        per_task = [_fmt([r["per_task_accuracy"][t] for r in runs]) for t in tasks]
        mean = _fmt([r["mean_accuracy"] for r in runs])
        mb = _fmt([(r["total_bytes_up"] + r["total_bytes_down"]) / 1e6 for r in runs], digits=2)
        spr = _fmt([r["seconds_per_round"] for r in runs], digits=1)
        aris = [a for r in runs for a in r["clustering_agreement_per_round"][1:] if a is not None]
        clustered = aris and method in ("fltac", "oracle")
        ari = f"{min(aris):.2f}–{max(aris):.2f}" if clustered else "n/a"
        lines.append(
            "| "
            + " | ".join([METHODS[method], *per_task, mean, mb, spr, ari, str(len(runs))])
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fltac_default"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--overrides", default="", help="extra Hydra overrides for every run")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        jobs = {
            f"{m}-s{seed}": f"method={m} seed={seed} {args.overrides}"
            for seed in args.seeds
            for m in args.methods
        }
        run_all(args.out.resolve(), jobs)
    text = table(args.out.resolve(), args.methods)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
