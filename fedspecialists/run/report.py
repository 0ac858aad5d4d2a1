"""``fedspecialists-report``: paper-style tables and plots from run folders (or sweep folders).

Usage::

    fedspecialists-report ~/fedspecialists-runs/sweeps/20261121-101500 --out docs/results/rank_sweep

Every folder under the given paths that holds ``summary.json`` and ``config.yaml`` is a run; runs
that did not complete (``status.json``) are listed and left out of the numbers. Runs are grouped by
method and setting (LoRA rank for the adapter methods, P for the mixture-of-experts ones); the
seeds of a group give mean ± std. Written to ``--out``:

* ``report.md`` and ``report.csv``: per-task accuracy, mean accuracy, trained parameters sent per
  client and round, bytes (train, up + down), seeds: the shape of the papers' tables;
* ``accuracy_vs_rank.png``: mean accuracy against LoRA rank, one line per method (seed bands);
* ``accuracy_vs_bytes.png``: mean accuracy against cumulative bytes, round by round;
* ``per_task_rounds.png``: per-task accuracy over rounds per method and rank (seed bands).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedspecialists import methods
from fedspecialists.run.status import read_status


@dataclass
class Run:
    """One completed run as the report needs it."""

    path: Path
    method: str
    setting: str  # "r<rank>", "P<peers>" (FedMoE-DA) or "-"
    rank: int | None
    seed: int
    suite: str
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    family: str = "adapters"  # of the method (fedspecialists.methods): adapters or moe

    @property
    def accuracy(self) -> float | None:
        value = self.summary.get("mean_accuracy")
        return None if value is None else float(value)

    @property
    def per_task(self) -> dict[str, float]:
        if self.family == "moe":
            return {k: float(v) for k, v in self.summary.get("domain_accuracy", {}).items()}
        return {k: float(v) for k, v in self.summary.get("per_task_accuracy", {}).items()}

    @property
    def bytes(self) -> int:
        return int(self.summary.get("total_bytes_up", 0)) + int(
            self.summary.get("total_bytes_down", 0)
        )

    @property
    def parameters(self) -> int | None:
        if "adapter_parameters" in self.summary:
            return int(self.summary["adapter_parameters"])
        parts = self.summary.get("parameters")
        shared = self.summary.get("shared_parts")
        if isinstance(parts, dict) and isinstance(shared, list):
            return int(sum(v for k, v in parts.items() if k in shared))
        return None


def find_runs(paths: Iterable[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Completed runs under ``paths``, and the (folder, status) of those that did not complete."""
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    # A run folder holds config.yaml and status.json (written when the run starts). Skipped:
    # Flower's own folders (a SuperLink home keeps copies of the app, docs/results included).
    folders = sorted(
        {
            p.parent
            for root in paths
            for p in Path(root).rglob("status.json")
            if (p.parent / "config.yaml").exists() and not _in_flower_home(p, Path(root))
        }
    )
    for folder in folders:
        status = str(read_status(folder)["status"])  # "interrupted": died while running
        if status != "completed" or not (folder / "summary.json").exists():
            skipped.append((folder, status))
            continue
        summary = json.loads((folder / "summary.json").read_text())
        cfg: Any = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
        method = str(cfg["method"]["name"])
        family = family_of(cfg)
        moe = family == "moe"
        rank = None if moe else int(cfg["lora"]["rank"])
        if method == "fedmoe_da":
            setting = f"P{cfg['fedmoe_da']['num_peers']}"
        else:
            setting = "-" if moe else f"r{rank}"
        metrics = folder / "metrics.jsonl"
        rounds = (
            [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if metrics.exists()
            else []
        )
        runs.append(
            Run(
                folder,
                method,
                setting,
                rank,
                int(cfg["seed"]),
                str(cfg["suite"]["name"]),
                summary,
                rounds,
                family,
            )
        )
    return runs, skipped


def family_of(cfg: dict[str, Any]) -> str:
    """The family of a run folder's method: from the registry, else from its config's sections
    (a plugin method whose module this process cannot import)."""
    try:
        return methods.get(str(cfg["method"]["name"])).family
    except KeyError:
        return "moe" if "fedmoe_da" in cfg and "fltac" not in cfg else "adapters"


def _in_flower_home(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts[:-1]
    return any(p.startswith(".") or p in ("flwr-home", "apps") for p in parts)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    if not values:
        return "–"
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def group(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs by (suite, method, setting), ordered by suite, method, then rank / P."""
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.suite, run.method, run.setting)].append(run)

    def order(key: tuple[str, str, str]) -> tuple[str, str, int]:
        return key[0], key[1], int(key[2][1:]) if key[2][1:].isdigit() else -1

    return {k: sorted(groups[k], key=lambda r: r.seed) for k in sorted(groups, key=order)}


def table_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Header and rows of the markdown table, and the same numbers as CSV records."""
    groups = group(runs)
    tasks = sorted({t for r in runs for t in r.per_task})
    header = [
        "suite",
        "method",
        "setting",
        *tasks,
        "mean",
        "params",
        "MB (train, up+down)",
        "seeds",
    ]
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for (suite, method, setting), members in groups.items():
        per_task = {t: [r.per_task[t] for r in members if t in r.per_task] for t in tasks}
        accuracy = [r.accuracy for r in members if r.accuracy is not None]
        mb = [r.bytes / 1e6 for r in members]
        params = {r.parameters for r in members if r.parameters is not None}
        rows.append(
            [
                suite,
                method,
                setting,
                *(_pm(per_task[t]) for t in tasks),
                _pm(accuracy),
                ", ".join(f"{p:,}" for p in sorted(params)) or "–",
                _pm(mb, 2),
                " ".join(str(r.seed) for r in members),
            ]
        )
        record: dict[str, Any] = {"suite": suite, "method": method, "setting": setting}
        for t in tasks:
            record[f"{t}_mean"], record[f"{t}_std"] = mean_std(per_task[t])
        record["mean_accuracy"], record["mean_accuracy_std"] = mean_std(accuracy)
        record["parameters"] = min(params) if params else ""
        record["mb_mean"], record["mb_std"] = mean_std(mb)
        record["seeds"] = len(members)
        records.append(record)
    return header, rows, records


def write_tables(runs: Sequence[Run], out: Path, skipped: Sequence[tuple[Path, str]]) -> Path:
    header, rows, records = table_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    text += (
        "\nAccuracy after the last round, mean ± std over seeds (for MoE methods: personalised "
        "accuracy, and per-domain columns). `params` = trainable parameters of one adapter "
        "(FL-TAC clients send one per local task, FedIT one in all) or of the MoE parts the "
        "server aggregates; MB = every training message, up and down, over all rounds; `seeds` "
        "lists the seeds averaged.\n"
    )
    if skipped:
        text += "\nNot included (did not complete):\n" + "".join(
            f"* `{p}`: {status}\n" for p, status in skipped
        )
    (out / "report.md").write_text(text)
    with (out / "report.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["method"])
        writer.writeheader()
        writer.writerows(records)
    return out / "report.md"


def write_plots(runs: Sequence[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written: list[Path] = []
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.rank is not None and run.accuracy is not None:
            by_method[run.method][run.rank].append(run.accuracy)
    if by_method:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, ranks in sorted(by_method.items()):
            xs = sorted(ranks)
            means = np.array([np.mean(ranks[x]) for x in xs])
            lo = np.array([np.min(ranks[x]) for x in xs])
            hi = np.array([np.max(ranks[x]) for x in xs])
            (line,) = ax.plot(xs, means, "o-", label=method)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="LoRA rank",
            ylabel="mean accuracy (last round)",
            title="accuracy vs rank (line = mean, band = min..max over seeds)",
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_rank.png", dpi=110)
        plt.close(fig)
        written.append(out / "accuracy_vs_rank.png")

    groups = group(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (_, method, setting), members in groups.items():
        curves = [
            [
                (
                    r.get("bytes", {}).get("cumulative", {}).get("train_up", 0)
                    + r.get("bytes", {}).get("cumulative", {}).get("train_down", 0)
                )
                / 1e6
                for r in run.rounds
            ]
            for run in members
        ]
        accs = [[r.get("mean_accuracy") or np.nan for r in run.rounds] for run in members]
        n = min(len(c) for c in curves) if curves else 0
        if n == 0:
            continue
        x = np.mean([c[:n] for c in curves], axis=0)
        y = np.array([a[:n] for a in accs], dtype=float)
        seen = ~np.all(np.isnan(y), axis=0)  # rounds without evaluation (evaluate_every) left out
        ax.plot(x[seen], np.nanmean(y[:, seen], axis=0), "o-", ms=3, label=f"{method} {setting}")
    ax.set_xscale("log")
    ax.set(
        xlabel="cumulative MB (train, up+down)",
        ylabel="mean accuracy",
        title="accuracy vs communication, round by round",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=110)
    plt.close(fig)
    written.append(out / "accuracy_vs_bytes.png")

    tasks = sorted({t for r in runs for t in r.per_task})
    if tasks:
        cols = min(len(tasks), 4)
        fig, axes = plt.subplots(1, cols, figsize=(3.6 * cols, 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=False):
            for (_, method, setting), members in groups.items():
                key = "domain_accuracy" if members[0].family == "moe" else "accuracy"
                series = []
                for run in members:
                    values = []
                    for r in run.rounds:
                        acc = r.get(key)
                        if isinstance(acc, dict):
                            values.append(acc.get(task, np.nan))
                        elif isinstance(acc, list):
                            names = run.summary.get("domains", [])
                            values.append(acc[names.index(task)] if task in names else np.nan)
                    series.append(values)
                n = min(len(s) for s in series)
                if n == 0:
                    continue
                y = np.array([s[:n] for s in series], dtype=float)
                x = np.arange(1, n + 1)
                (line,) = ax.plot(x, np.nanmean(y, axis=0), label=f"{method} {setting}")
                ax.fill_between(
                    x,
                    np.nanmin(y, axis=0),
                    np.nanmax(y, axis=0),
                    color=line.get_color(),
                    alpha=0.12,
                )
            ax.set(title=task, xlabel="round", ylabel="accuracy")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "per_task_rounds.png", dpi=110)
        plt.close(fig)
        written.append(out / "per_task_rounds.png")
    return written


def report(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write the report of every run under ``paths`` into ``out``; return what was found."""
    runs, skipped = find_runs(paths)
    if not runs:
        raise SystemExit(f"no completed run (summary.json + status 'completed') under {paths}")
    out.mkdir(parents=True, exist_ok=True)
    table = write_tables(runs, out, skipped)
    plots = write_plots(runs, out)
    return {"runs": len(runs), "skipped": len(skipped), "table": table, "plots": plots}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tables and plots from fedspecialists runs.")
    parser.add_argument("paths", type=Path, nargs="+", help="sweep folders or run folders")
    parser.add_argument("--out", type=Path, default=None, help="default: the first path")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0]
    found = report(args.paths, out)
    print((out / "report.md").read_text())
    print(
        f"{found['runs']} run(s), {found['skipped']} skipped; plots: "
        + ", ".join(str(p) for p in found["plots"])
    )


if __name__ == "__main__":
    main()
