"""FL-TAC's clustering on suites it was not built around: every method, several seeds.

Suites: the embedded default (four tasks, 5/3/2/2 labels), two stress suites whose tasks share
one label count (``stress_binary``, ``stress_three_way``) and eight tasks with an automatic K
(``stress_eight``, ``fltac.num_clusters=auto``). Methods: FL-TAC with the project's defaults,
FL-TAC with label fingerprints and round 1 on the fingerprints alone, FL-TAC as the paper has
it (plain K-means on the adapters alone), oracle clustering, FedIT at rank 16 and
local only. Every run is a real ``flwr run`` on a local simulation SuperLink (10 SuperNodes),
started and stopped by this script; the tables are built from the run folders.

Usage::

    python benchmarks/fltac_clustering.py --out runs/fltac_clustering
    python benchmarks/fltac_clustering.py --out runs/fltac_clustering --table-only
    # a subset, e.g. what the CI-sized check of a new default would run first:
    python benchmarks/fltac_clustering.py --suites stress_binary --methods fltac --seeds 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import fmt, parallel_clients, run_all

SUITES = ("offline_text", "stress_binary", "stress_three_way", "stress_eight")
AUTO_K_SUITES = ("stress_eight",)  # run with fltac.num_clusters=auto
METHODS = {
    "fltac": (
        "FL-TAC (default: input fingerprints, label-count split, source check)",
        "method=fltac",
    ),
    "fltac_label": (
        "FL-TAC (default + label fingerprints, round 1 on the fingerprints alone)",
        "method=fltac fltac.label_fingerprint=true fltac.fingerprints_only_from_v0=true",
    ),
    "fltac_heads_round1": (
        "FL-TAC (default + label fingerprints, heads in round 1 too)",
        "method=fltac fltac.label_fingerprint=true",
    ),
    "fltac_nocheck": (
        "FL-TAC (input fingerprints + label-count split, no source check)",
        "method=fltac fltac.source_check=false",
    ),
    "fltac_fingerprint": (
        "FL-TAC (input fingerprints only: an earlier default)",
        "method=fltac fltac.source_check=false fltac.split_by_label_count=false"
        " fltac.label_fingerprint=false fltac.fingerprints_only_from_v0=false",
    ),
    "fltac_weighted": (
        "FL-TAC (default + K-means weighted by example count)",
        "method=fltac fltac.kmeans_weighting=samples",
    ),
    "fltac_refine": (
        "FL-TAC (default + Hartigan's moves after constrained K-means)",
        "method=fltac fltac.refine_moves=true",
    ),
    "fltac_paper": (
        "FL-TAC (paper: plain K-means on the adapters)",
        "method=fltac fltac.clustering=kmeans fltac.input_fingerprint=false"
        " fltac.label_fingerprint=false fltac.source_check=false fltac.split_by_label_count=false",
    ),
    "fltac_hybrid": (
        "FL-TAC (fingerprints + update features; no source check, no label-count split)",
        "method=fltac fltac.feature_source=cumulative+update fltac.source_check=false"
        " fltac.split_by_label_count=false fltac.label_fingerprint=false"
        " fltac.fingerprints_only_from_v0=false",
    ),
    "oracle": ("Oracle clustering", "method=oracle"),
    "fedit": ("FedIT (rank 16)", "method=fedit"),
    "local": ("Local only", "method=local"),
}


def job_name(suite: str, method: str, seed: int) -> str:
    return f"{suite}--{method}-s{seed}"


def jobs_for(suites: list[str], methods: list[str], seeds: list[int]) -> dict[str, str]:
    """Run-folder name -> overrides, method-major (the methods listed first run first)."""
    jobs = {}
    for method in methods:
        for seed in seeds:
            for suite in suites:
                extra = " fltac.num_clusters=auto" if suite in AUTO_K_SUITES else ""
                overrides = f"{METHODS[method][1]} suite={suite} seed={seed}{extra}"
                jobs[job_name(suite, method, seed)] = overrides
    return jobs


def _runs(out: Path, suite: str, method: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(out.glob(f"{suite}--{method}-s*/summary.json")):
        summary = json.loads(path.read_text())
        summary["_name"] = path.parent.name
        runs.append(summary)
    return runs


def _source_swaps(folder: Path) -> list[str]:
    """Slots the clients' source check moved, per round (empty: the check was off)."""
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [str(r["source_swaps"]) for r in rounds if "source_swaps" in r]


def _mb(run: dict[str, Any]) -> float:
    return float(run["total_bytes_up"] + run["total_bytes_down"]) / 1e6


def suite_table(out: Path, suite: str, methods: list[str]) -> str:
    """One markdown table: per-task and mean accuracy, bytes, agreement per round and seed."""
    runs = {m: _runs(out, suite, m) for m in methods}
    tasks = sorted({t for rs in runs.values() for r in rs for t in r["per_task_accuracy"]})
    head = ["method", *tasks, "mean", "MB up+down", "× FedIT bytes", "ARI per round (per seed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fedit_mb = [_mb(r) for r in runs.get("fedit", [])]
    for method in methods:
        rs = runs[method]
        if not rs:
            continue
        per_task = [fmt([r["per_task_accuracy"].get(t, float("nan")) for r in rs]) for t in tasks]
        mbs = [_mb(r) for r in rs]
        # Means, not sums: the two rows may hold different numbers of seeds.
        ratio = (
            f"{(sum(mbs) / len(mbs)) / (sum(fedit_mb) / len(fedit_mb)):.2f}" if fedit_mb else "n/a"
        )
        clustered = method.startswith("fltac")
        ari = (
            "; ".join(
                f"s{r['seed']}: "
                + " ".join(f"{a:.2f}" for a in r["clustering_agreement_per_round"])
                for r in rs
            )
            if clustered
            else "n/a"
        )
        name = f"{METHODS[method][0]} ({len(rs)} seeds)"
        mean = fmt([r["mean_accuracy"] for r in rs])
        lines.append(
            "| " + " | ".join([name, *per_task, mean, fmt(mbs, digits=1), ratio, ari]) + " |"
        )
    return "\n".join(lines)


def targets(out: Path, suite: str) -> list[str]:
    """The issue's targets for FL-TAC's default on one suite, as measured (per seed)."""
    lines = []
    fltac = {r["seed"]: r for r in _runs(out, suite, "fltac")}
    oracle = {r["seed"]: r for r in _runs(out, suite, "oracle")}
    fedit = {r["seed"]: r for r in _runs(out, suite, "fedit")}
    for seed, run in sorted(fltac.items()):
        aris = run["clustering_agreement_per_round"]
        from2 = min(aris[1:]) if len(aris) > 1 else float("nan")
        from3 = min(aris[2:]) if len(aris) > 2 else float("nan")
        parts = [f"s{seed}: agreement min from round 2 {from2:.2f}, from round 3 {from3:.2f}"]
        swaps = _source_swaps(out / run["_name"])
        if swaps:
            parts.append("slots moved by the source check per round " + " ".join(swaps))
        if seed in oracle:
            ratio = run["mean_accuracy"] / oracle[seed]["mean_accuracy"]
            parts.append(f"mean accuracy {ratio:.3f}× the oracle's")
        if seed in fedit:
            parts.append(f"bytes {_mb(run) / _mb(fedit[seed]):.2f}× FedIT's")
        lines.append("; ".join(parts))
    if fltac and oracle and fedit:
        seeds = sorted(set(fltac) & set(oracle) & set(fedit))

        def mean_of(runs: dict[int, dict[str, Any]], task: str) -> float:
            return sum(runs[s]["per_task_accuracy"][task] for s in seeds) / len(seeds)

        tasks = sorted(fltac[seeds[0]]["per_task_accuracy"]) if seeds else []
        for task in tasks:
            o, f, t = mean_of(oracle, task), mean_of(fedit, task), mean_of(fltac, task)
            verdict = "beats" if t > f else "does not beat"
            lines.append(
                f"{task}: oracle {o:.3f}, FedIT {f:.3f}, FL-TAC {t:.3f} ({verdict} FedIT"
                f"{'; the oracle beats FedIT' if o > f else ''})"
            )
    return lines


def overview(out: Path, suites: list[str], methods: list[str]) -> str:
    """Mean accuracy per suite and method (mean ± std over seeds, seed count), and FL-TAC's
    lowest agreement from round 2 on."""
    head = ["method", *suites]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = []
        for suite in suites:
            rs = _runs(out, suite, method)
            cell = f"{fmt([r['mean_accuracy'] for r in rs])} ({len(rs)})" if rs else "not run"
            cells.append(cell)
        lines.append("| " + " | ".join([METHODS[method][0], *cells]) + " |")
    cells = []
    for suite in suites:
        aris = [
            a for r in _runs(out, suite, "fltac") for a in r["clustering_agreement_per_round"][1:]
        ]
        cells.append(f"{min(aris):.2f}" if aris else "not run")
    lines.append("| " + " | ".join(["FL-TAC default: lowest agreement, rounds 2–6", *cells]) + " |")
    return "\n".join(lines)


def report(out: Path, suites: list[str], methods: list[str]) -> str:
    parts = [
        "Mean accuracy after the last round (seeds run):",
        "",
        overview(out, suites, methods),
        "",
    ]
    for suite in suites:
        parts += [f"### {suite}", "", suite_table(out, suite, methods), ""]
        measured = targets(out, suite)
        if measured:
            parts += ["Targets, measured:", "", *[f"* {line}" for line in measured], ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fltac_clustering"))
    parser.add_argument("--suites", nargs="+", default=list(SUITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "fltac",
            "fltac_label",
            "fltac_nocheck",
            "fltac_paper",
            "oracle",
            "fedit",
            "local",
        ],
        choices=list(METHODS),
    )
    parser.add_argument(
        "--parallel-clients",
        type=int,
        default=1,
        help="ClientApps trained at once, each on cores/N threads (same seeds, same budget)",
    )
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        jobs = jobs_for(args.suites, args.methods, args.seeds)
        jobs, federation, _ = parallel_clients(jobs, args.parallel_clients)
        run_all(args.out.resolve(), jobs, federation_config=federation)
    text = report(args.out.resolve(), args.suites, args.methods)
    (args.out / "tables.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
