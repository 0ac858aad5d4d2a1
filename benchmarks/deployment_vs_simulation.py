"""Round time of the same experiment in Flower's simulation engine and in a real deployment.

Both on this machine: simulation = a local simulation SuperLink with N simulated SuperNodes;
deployment = a TLS SuperLink with SuperNode authentication, N SuperNode processes and their gRPC
peer endpoints (``fedspecialists.deploy.federation``), without and with a warm site per
SuperNode (``--warm-sites off on``), with SuperNodes polling for work every 0.2 s
(``fedspecialists-supernode``) or as Flower's own do (``--supernode-poll flower 0.2``), and
with ClientApps started as Flower starts them or forked from a process that imported Flower
once (``--prefork off on``; ``fedspecialists.deploy.superexec``). The table reads the runs'
``metrics.jsonl`` and ``summary.json``. With ``--trace`` every process of a deployment writes
timing events (:mod:`fedspecialists.trace`) to ``<engine>-home/trace.jsonl``, and a second
table says where a phase's time went, step by step (medians over nodes and phases).

Usage::

    python benchmarks/deployment_vs_simulation.py --out runs/deploy_vs_sim --nodes 3 \
        --experiment fedmoe_da="method=fedmoe_da num_rounds=3" \
        --experiment fltac="method=fltac num_rounds=3"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from pathlib import Path

from fedspecialists.deploy.federation import local_federation
from fedspecialists.deploy.supernode import DEFAULT_POLL_S
from fedspecialists.run.local import RunOutcome, local_superlink, run_app
from fedspecialists.trace import STEPS, TRACE_ENV, phase_times, read_events

DEFAULT_EXPERIMENTS = ["fedmoe_da=method=fedmoe_da num_rounds=3"]


def _row(name: str, engine: str, outcome: RunOutcome, run: Path) -> str:
    metrics = run / "metrics.jsonl"
    rounds = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    times = [float(r["round_time_s"]) for r in rounds]
    first = f"{times[0]:.1f}" if times else "n/a"
    later = f"{statistics.mean(times[1:]):.1f}" if len(times) > 1 else "n/a"
    wall = f"{float(rounds[-1]['wall_time_s']):.1f}" if rounds else "n/a"
    return f"| {name} | {engine} | {outcome.status} | {first} | {later} | {wall} | {len(times)} |"


def trace_rows(name: str, engine: str, path: Path) -> list[str]:
    """Median seconds of each step (:func:`fedspecialists.trace.phase_times`) over the nodes of
    each kind's phases after its first (round 1's; a run's phases come in round order), as
    table rows."""
    if not path.exists():
        return []
    rows = []
    phases = phase_times(read_events(path))
    for kind in sorted({p["phase"] for p in phases}):
        mine = [p for p in phases if p["phase"] == kind][1:]  # round 1's phase left out
        nodes = [t for p in mine for t in p["nodes"].values()]
        if not nodes:
            continue
        steps = [f"{statistics.median(t[s] for t in nodes):.2f}" for s in STEPS]
        total = f"{statistics.median(p['total'] for p in mine):.2f}"
        cells = [name, engine, kind, str(len(mine)), total, *steps]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _engine(warm: bool, poll: str, prefork: bool = False) -> str:
    """``deployment[-warm]``, then ``-flower-poll`` for Flower's own SuperNode, ``-poll-S`` for
    a poll interval other than the default, then ``-prefork``."""
    name = "deployment-warm" if warm else "deployment"
    if poll == "flower":
        name = f"{name}-flower-poll"
    elif float(poll) != DEFAULT_POLL_S:
        name = f"{name}-poll-{poll}"
    return f"{name}-prefork" if prefork else name


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/deploy_vs_sim"))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--experiment",
        action="append",
        metavar="NAME=OVERRIDES",
        help="an experiment to time in both engines (repeatable)",
    )
    parser.add_argument(
        "--warm-sites",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="deployments to time: without (off) and with (on) a warm site per SuperNode",
    )
    parser.add_argument(
        "--supernode-poll",
        nargs="+",
        default=[str(DEFAULT_POLL_S)],
        metavar="SECONDS|flower",
        help="SuperNodes polling every SECONDS (fedspecialists-supernode), or Flower's own",
    )
    parser.add_argument(
        "--prefork",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="ClientApps started as Flower does (off, the published tables), or forked from a "
        "warm process (on, the loopback federation's default)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="time every step of a deployment's phases"
    )
    args = parser.parse_args()
    experiments = dict(e.split("=", 1) for e in (args.experiment or DEFAULT_EXPERIMENTS))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = f"federation.num_clients={args.nodes} output.root={out}"
    outcomes: dict[tuple[str, str], RunOutcome] = {}
    with local_superlink(out / "sim-home") as link:
        for name, overrides in experiments.items():
            outcome = run_app(
                link,
                f"{overrides} {common} output.name={name}-simulation",
                num_supernodes=args.nodes,
            )
            outcomes[name, "simulation"] = outcome
            print(name, "simulation:", outcome.status, flush=True)
    for warm, poll, fork in itertools.product(args.warm_sites, args.supernode_poll, args.prefork):
        if fork == "on" and poll == "flower":
            continue  # forking needs fedspecialists-supernode
        engine = _engine(warm == "on", poll, fork == "on")
        home = out / f"{engine}-home"
        if args.trace:  # every process of this federation inherits it
            home.mkdir(parents=True, exist_ok=True)
            os.environ[TRACE_ENV] = str(home / "trace.jsonl")
        poll_s = None if poll == "flower" else float(poll)
        with local_federation(
            home,
            num_sites=args.nodes,
            warm_sites=warm == "on",
            supernode_poll_s=poll_s,
            prefork=fork == "on",
        ) as fed:
            fed.wait_for_nodes(args.nodes)
            for name, overrides in experiments.items():
                outcome = fed.run(
                    f"{overrides} {common} federation.node_wait_s=120 output.name={name}-{engine}"
                )
                outcomes[name, engine] = outcome
                print(name, f"{engine}:", outcome.status, flush=True)
                trace_file = home / "trace.jsonl"
                if trace_file.exists():  # each experiment's events apart (writers reopen it)
                    trace_file.rename(home / f"trace-{name}.jsonl")
    lines = [
        "| experiment | engine | status | round 1 (s) | later rounds (s) | run (s) | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, engine), outcome in sorted(outcomes.items()):
        lines.append(_row(name, engine, outcome, out / f"{name}-{engine}"))
    setup = "\n".join(f"- {name}: `{o} {common}`" for name, o in experiments.items())
    text = "\n".join(lines)
    traced = [
        row
        for name, engine in sorted(outcomes)
        for row in trace_rows(name, engine, out / f"{engine}-home" / f"trace-{name}.jsonl")
    ]
    if traced:
        head = "| experiment | engine | phase | phases | total | " + " | ".join(STEPS) + " |"
        text += "\n\nMedian seconds per step, rounds 2 and later:\n\n" + head + "\n"
        text += "|---|---|---|---|---|" + "---|" * len(STEPS) + "\n" + "\n".join(traced)
    (out / "table.md").write_text(f"{text}\n\n{args.nodes} nodes. Overrides:\n{setup}\n")
    print(text)


if __name__ == "__main__":
    main()
