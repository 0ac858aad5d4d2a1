"""Round time of the same experiment in Flower's simulation engine and in a real deployment.

Both on this machine: simulation = a local simulation SuperLink with N simulated SuperNodes;
deployment = a TLS SuperLink with SuperNode authentication, N SuperNode processes and their gRPC
peer endpoints (``fedspecialists.federation``). The table reads the runs' ``metrics.jsonl``.

Usage::

    python benchmarks/deployment_vs_simulation.py --out runs/deploy_vs_sim --nodes 3 \
        --overrides "method=fedmoe_da num_rounds=3"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedspecialists.federation import local_federation
from fedspecialists.localrun import local_superlink, run_app


def _round_times(run: Path) -> list[float]:
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [float(r["round_time_s"]) for r in rounds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/deploy_vs_sim"))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--overrides", default="method=fedmoe_da num_rounds=3")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = f"{args.overrides} federation.num_clients={args.nodes} output.root={out}"
    with local_superlink(out / "sim-home") as link:
        sim = run_app(link, f"{common} output.name=simulation", num_supernodes=args.nodes)
    print("simulation:", sim.status, flush=True)
    with local_federation(out / "deployment-home", num_sites=args.nodes) as fed:
        fed.wait_for_nodes(args.nodes)
        dep = fed.run(f"{common} federation.node_wait_s=120 output.name=deployment")
    print("deployment:", dep.status, flush=True)
    lines = [
        "| engine | status | round 1 (s) | later rounds, mean (s) | rounds |",
        "|---|---|---|---|---|",
    ]
    for name, outcome in (("simulation", sim), ("deployment", dep)):
        times = _round_times(out / name) if (out / name / "metrics.jsonl").exists() else []
        later = f"{statistics.mean(times[1:]):.1f}" if len(times) > 1 else "n/a"
        first = f"{times[0]:.1f}" if times else "n/a"
        lines.append(f"| {name} | {outcome.status} | {first} | {later} | {len(times)} |")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + f"\n\noverrides: `{common}`\n")
    print(text)


if __name__ == "__main__":
    main()
