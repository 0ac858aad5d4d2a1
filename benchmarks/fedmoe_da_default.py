"""The FedMoE-DA default table: the offline image-domain benchmark, every method, several seeds.

Each run is a real ``flwr run`` of the app on a local simulation SuperLink (10 SuperNodes),
started and stopped by this script; the table and the comparison plot are built from the runs'
``summary.json`` and ``metrics.jsonl`` files.

Usage::

    python benchmarks/fedmoe_da_default.py --out runs/fedmoe_da_default --seeds 0 1 2
    python benchmarks/fedmoe_da_default.py --out runs/fedmoe_da_default --table-only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmoe_da_scarce import CROSS_INDEX  # experts matched at any index: the old default
from runner import fmt as _fmt
from runner import run_all

# label -> (Hydra overrides, description)
# The previous defaults (the re-implementations' reading): gate rows as proxies, mixed every
# round, float32 payloads. Today's defaults come from benchmarks/fedmoe_da_scarce.py.
PREVIOUS = f"fedmoe_da.proxy=gate fedmoe_da.mix_every=1 peer.half_precision=false {CROSS_INDEX}"
METHODS = {
    "fedmoe_da": (
        "method=fedmoe_da",
        "FedMoE-DA, default (P=5, tau=1, gate-change proxy, same index, float16, every 3 rounds)",
    ),
    "fedmoe_da_cross_index": (
        f"method=fedmoe_da {CROSS_INDEX}",
        "FedMoE-DA, experts matched at any index (the default before same_index)",
    ),
    "fedmoe_da_previous": (
        f"method=fedmoe_da {PREVIOUS}",
        "FedMoE-DA, previous default (P=5, tau=1, I=1, gate proxy, every round)",
    ),
    "fedmoe_da_tau0.1": (
        f"method=fedmoe_da {PREVIOUS} fedmoe_da.tau=0.1",
        "FedMoE-DA, previous default with tau=0.1",
    ),
    "fedavg_moe": ("method=fedavg_moe", "FedAvg, whole MoE model"),
    "fedavg_dense": ("method=fedavg_dense", "FedAvg, dense model of similar size"),
    "local_moe": ("method=local_moe", "Local only (MoE)"),
    "fedmoe_da_p0": ("method=fedmoe_da_p0", "FedMoE-DA, P=0 (no expert aggregation)"),
}


def _runs(out: Path, label: str) -> list[dict]:
    return [
        json.loads(p.read_text())
        for p in sorted(out.glob(f"{label}-s*/summary.json"))
        if json.loads((p.parent / "status.json").read_text())["status"] == "completed"
    ]


def table(out: Path, labels: list[str]) -> str:
    head = [
        "method",
        "personalised acc.",
        "acc. right after local training",
        "spread across clients (std)",
        "global test acc.",
        "server MB (train, up+down)",
        "peer MB",
        "s / round",
        "seeds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        runs = _runs(out, label)
        if not runs:
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    METHODS[label][1],
                    _fmt([r["personalised_accuracy"] for r in runs]),
                    _fmt([r["accuracy_after_training"] for r in runs]),
                    _fmt([r["personalised_accuracy_std"] for r in runs]),
                    _fmt([r["global_accuracy"] for r in runs]),
                    _fmt([r["total_server_bytes"] for r in runs], 1e-6, 2),
                    _fmt([r["total_peer_bytes"] for r in runs], 1e-6, 1),
                    _fmt([r["seconds_per_round"] for r in runs], digits=1),
                    str(len(runs)),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(out: Path, labels: list[str]) -> Path:
    """Personalised accuracy over rounds per method (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        curves, server, peer = [], [], []
        for run in sorted(out.glob(f"{label}-s*")):
            metrics = run / "metrics.jsonl"
            if not (run / "summary.json").exists() or not metrics.exists():
                continue
            rounds = [json.loads(x) for x in metrics.read_text().splitlines()]
            curves.append([r["personalised_accuracy"]["mean"] for r in rounds])
            cum = [r["bytes"]["cumulative"] for r in rounds]
            server.append([(c.get("train_up", 0) + c.get("train_down", 0)) / 1e6 for c in cum])
            peer.append([r["peer_bytes"]["cumulative"] / 1e6 for r in rounds])
        if not curves:
            continue
        acc = np.array(curves, dtype=float)
        x = np.arange(1, acc.shape[1] + 1)
        (line,) = ax.plot(x, acc.mean(0), label=METHODS[label][1])
        ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
        bx.plot(x, np.mean(server, 0), color=line.get_color(), label=f"{label}: server")
        if np.mean(peer, 0)[-1] > 0:
            bx.plot(x, np.mean(peer, 0), "--", color=line.get_color(), label=f"{label}: peers")
    ax.set(xlabel="round", ylabel="personalised accuracy", title="accuracy (mean of seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set(xlabel="round", ylabel="cumulative MB", yscale="log", title="server vs peer bytes")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=6)
    fig.tight_layout()
    path = out / "accuracy_and_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fedmoe_da_default"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--overrides", default="", help="extra Hydra overrides for every run")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.table_only:
        jobs = {
            f"{label}-s{seed}": f"{METHODS[label][0]} seed={seed} {args.overrides}"
            for seed in args.seeds
            for label in args.methods
        }
        run_all(out, jobs)
    text = table(out, args.methods)
    (out / "table.md").write_text(text + "\n")
    plot(out, args.methods)
    print(text)


if __name__ == "__main__":
    main()
