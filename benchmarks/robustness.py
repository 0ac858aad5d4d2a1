"""Runs that survive: kill-and-resume, faults, finite attacks with the robust options, local DP.

Every run is a real ``flwr run`` of the app with its default settings (10 SuperNodes) plus the
overrides named in the tables; tables come from the runs' files.

Usage::

    python benchmarks/robustness.py resume  --out runs/robustness --seeds 0
    python benchmarks/robustness.py faults  --out runs/robustness --seeds 0
    python benchmarks/robustness.py attacks --out runs/robustness --seeds 0 [--method fedmoe_da]
    python benchmarks/robustness.py dp      --out runs/robustness --seeds 0
    python benchmarks/robustness.py faults  --out runs/robustness --table-only

``resume`` runs each method's default uninterrupted, then again, SIGKILLs the SuperLink and
everything under it at a seeded random moment of round 2 or 3, resumes the run from its folder
on a fresh SuperLink (``resume=<folder>``), and compares the two runs' metrics and tensors.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

from compare_runs import differences, tensors_equal
from runner import fmt, parallel_clients, run_all

from fedspecialists.run.checkpoint import checkpointed_round
from fedspecialists.run.local import local_superlink, run_app, submit_run

METHODS = {"fltac": "", "fedmoe_da": "method=fedmoe_da"}
# A healthy default round takes ~45 s (FL-TAC) or ~8 s (FedMoE-DA) here: time out at 90 s
# (FL-TAC) or 30 s (FedMoE-DA), so that a hung client costs a round little more than that.
NUM_CLIENTS = 10  # the default federation's size, on which the faulty share is drawn
TIMEOUT = {"fltac": "federation.reply_timeout_s=90", "fedmoe_da": "federation.reply_timeout_s=30"}


def _summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


def _rounds(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _accuracy(run: Path) -> float:
    summary = _summary(run)
    value = summary.get("personalised_accuracy", summary["mean_accuracy"])
    return float(value)


# -- kill and resume ------------------------------------------------------------------------------
def kill_and_resume(out: Path, method: str, seed: int) -> dict[str, Any]:
    """Uninterrupted run, then a run crashed in round 2 or 3 and resumed; how they compare."""
    base = f"{METHODS[method]} seed={seed}".strip()
    # Names of one length: FedMoE-DA's messages carry the run folder's path (peer stores).
    whole, cut = f"{method}-whole-s{seed}", f"{method}-split-s{seed}"
    run_all(out, {whole: base})
    rng = random.Random(seed)
    after = rng.choice([1, 2])  # the crash lands in round after + 1
    share = rng.uniform(0.0, 0.8)  # of that round's expected time (the round before's)
    if not (out / cut / "summary.json").exists():
        with local_superlink(out / "flwr-home-cut") as link:
            submit_run(link, f"{base} output.root={out} output.name={cut}", num_supernodes=10)
            while checkpointed_round(out / cut) < after:
                time.sleep(0.2)
            delay = share * _rounds(out / cut)[-1]["round_time_s"]
            time.sleep(delay)
            link.crash()
        killed_after = checkpointed_round(out / cut)
        with local_superlink(out / "flwr-home-resume") as link:
            overrides = f"{base} output.root={out} output.name={cut} resume={out / cut}"
            outcome = run_app(link, overrides, num_supernodes=10)
        (out / f"{cut}.log").write_text(outcome.log)
        (out / f"{cut}.kill.json").write_text(
            json.dumps({"killed_after_round": killed_after, "seconds_into_next": delay})
        )
    kill = json.loads((out / f"{cut}.kill.json").read_text())
    compared = unequal = 0
    where: list[str] = []
    for a, b in zip(_rounds(out / whole), _rounds(out / cut), strict=True):
        n, w = differences(a, b)
        compared, unequal = compared + n, unequal + len(w)
        where += [x for x in w if x not in where]
    return {
        "method": method,
        "seed": seed,
        **kill,
        "values_compared": compared,
        "values_unequal": unequal,
        "unequal_keys": where,
        "tensors_equal": tensors_equal(out / whole, out / cut),
        "personal_equal": _personal_equal(out / whole, out / cut),
        "accuracy": (_accuracy(out / whole), _accuracy(out / cut)),
    }


def _personal_equal(a: Path, b: Path) -> bool | None:
    """FedMoE-DA: each client's personal experts, by client folder (the run keys differ)."""
    from safetensors.numpy import load_file

    mine = {p.parent.parent.name: p for p in a.glob("nodes/node-*/run-*/personal.safetensors")}
    theirs = {p.parent.parent.name: p for p in b.glob("nodes/node-*/run-*/personal.safetensors")}
    if not mine:
        return None
    if mine.keys() != theirs.keys():
        return False
    import numpy as np

    for name, path in mine.items():
        x, y = load_file(str(path)), load_file(str(theirs[name]))
        if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in x):
            return False
    return True


def resume_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| method | seed | killed in round | s into it | metric values equal | tensors equal "
        "| personal experts equal | final accuracy (whole, resumed) | values that differ |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['killed_after_round'] + 1} | "
            f"{r['seconds_into_next']:.1f} | {r['values_compared'] - r['values_unequal']} of "
            f"{r['values_compared']} | {r['tensors_equal']} | {r['personal_equal']} | "
            f"{r['accuracy'][0]:.4f}, {r['accuracy'][1]:.4f} | "
            f"{', '.join(r['unequal_keys']) or 'none'} |"
        )
    return "\n".join(lines)


# -- faults -------------------------------------------------------------------------------------
def fault_jobs(seeds: list[int], method: str) -> dict[str, str]:
    """Clean runs at each participation, and crashes and hangs of 10, 30 and 50% of clients."""
    base = METHODS[method]
    jobs = {}
    for seed in seeds:
        common = f"{base} seed={seed} {TIMEOUT[method]}".strip()
        jobs[f"{method}-clean-s{seed}"] = common
        for pct in (10, 30, 50):
            f = pct / 100
            jobs[f"{method}-part{100 - pct}-s{seed}"] = (
                f"{common} federation.fraction_train={1 - f}"
            )
            for kind in ("crash", "hang", "absent"):  # absent: the same clients left out
                jobs[f"{method}-{kind}{pct}-s{seed}"] = (
                    f"{common} faults.kind={kind} faults.fraction={f} faults.seed={seed}"
                )
    return jobs


FAULT_HEAD = (
    "| run | rounds completed (aggregated) | replies failed / missing per round | accuracy "
    "| clean run, same participation | difference | clean run, same clients absent "
    "| difference |"
)


def _reference(run: Path, acc: float) -> tuple[str, str]:
    """A clean run's accuracy and ``acc`` minus it, as table cells (``n/a`` if not run)."""
    if not (run / "summary.json").exists():
        return "n/a", "n/a"
    ref = _accuracy(run)
    return f"{ref:.3f}", f"{acc - ref:+.3f}"


def fault_row(out: Path, run: Path, kind: str, pct: int) -> str:
    """One faulty run against the clean runs of its seed with the same participation: as many
    clients sampled at random (``part``), and the very clients that fail left out (``absent``)."""
    seed = run.name.rsplit("-s", 1)[1]
    method = run.name.split("-")[0]
    rounds = _rounds(run)
    aggregated = sum(bool(r.get("aggregated")) for r in rounds)
    failed = fmt([r["replies_failed"] for r in rounds], digits=1)
    missing = fmt([r.get("replies_missing", 0) for r in rounds], digits=1)
    acc = _accuracy(run)
    part = _reference(out / f"{method}-part{100 - pct}-s{seed}", acc)
    absent = _reference(out / f"{method}-absent{pct}-s{seed}", acc)
    return (
        f"| {kind} {pct}% (seed {seed}) | {len(rounds)} ({aggregated}) | {failed} / {missing} "
        f"| {acc:.3f} | {part[0]} | {part[1]} | {absent[0]} | {absent[1]} |"
    )


def fault_table(out: Path, method: str) -> str:
    lines = [FAULT_HEAD, "|---|---|---|---|---|---|---|---|"]
    for kind in ("crash", "hang"):
        for pct in (10, 30, 50):
            for path in sorted(out.glob(f"{method}-{kind}{pct}-s*/summary.json")):
                lines.append(fault_row(out, path.parent, kind, pct))
    for path in sorted(out.glob(f"{method}-clean-s*/summary.json")):
        acc = _accuracy(path.parent)
        lines.append(f"| clean, every client ({path.parent.name}) | | | {acc:.3f} | | | | |")
    return "\n".join(lines)


# -- attacks ------------------------------------------------------------------------------------
# ``absent``: the server leaves out the very clients that attack (no attack at all), so a run of
# it is what a screen that left out exactly the attackers' updates would reach: its ceiling
ATTACKS = {
    "fltac": ("sign_flip", "scale", "other_task", "absent"),
    "fedmoe_da": ("sign_flip", "scale", "absent"),
}
RULES = {
    "mean": "robust.rule=mean",
    "median": "robust.rule=median",
    "trimmed": "robust.rule=trimmed_mean robust.trim_fraction=0.2",
    "drop_opposed": "robust.rule=mean robust.drop_opposed_updates=true",  # the mean, screened
    "median_drop": "robust.rule=median robust.drop_opposed_updates=true",  # the median, screened
    # the mean, screened, leaving out every update of a node that sent an opposed one
    "drop_node": "robust.rule=mean robust.drop_opposed_updates=true robust.drop_opposed_scope=node",
    "clip_median": "robust.rule=mean robust.clip_to_median_norm=true",  # the mean, adaptive clip
    # the mean, only the norms that are outliers for the local steps behind them clipped
    "clip_steps": "robust.rule=mean robust.clip_outlier_norms_for_steps=true",
}
# FL-TAC only: node scope, with round 1 grouped on what the clients' data say (input and label
# fingerprints), which an attack on the updates cannot move (conf/defence/fltac_sign_flip.yaml);
# then also every update clipped to its cluster's median update norm (against scaling), or
# only the updates whose norm is an outlier of its cluster's (Hampel's identifier), or an
# outlier for the local steps behind it; or the coordinate-wise median instead of the mean
FLTAC_RULES = {
    "drop_node_fp": "+defence=fltac_sign_flip",
    "drop_node_fp_clip": "+defence=fltac_sign_flip robust.clip_to_median_norm=true",
    "drop_node_fp_hampel": "+defence=fltac_sign_flip robust.clip_outlier_norms=true",
    "drop_node_fp_median": "+defence=fltac_sign_flip robust.rule=median",
    # only the norms that are outliers for the local steps behind them (Hampel around a fit)
    "drop_node_fp_steps": "+defence=fltac_sign_flip robust.clip_outlier_norms_for_steps=true",
    # and replies refused whose heads moved another logit count than their data have classes
    "drop_node_fp_steps_labels": (
        "+defence=fltac_sign_flip robust.clip_outlier_norms_for_steps=true"
        " fltac.reject_label_count_mismatch=true"
    ),
    # or, where one order of its adapters fits its slots best, the reply taken in that order
    "drop_node_fp_steps_reorder": "+defence=fltac_finite_attacks",
}


def rules_of(method: str) -> dict[str, str]:
    """The aggregation rules (benchmark name -> overrides) the method is benchmarked with."""
    return RULES | FLTAC_RULES if method == "fltac" else dict(RULES)


def attack_jobs(seeds: list[int], method: str) -> dict[str, str]:
    """20% of clients attacking each round, under each aggregation rule (inside FL-TAC's
    clusters, or FedMoE-DA's backbone); and the rules on clean runs (their cost when nobody
    attacks)."""
    jobs = {}
    for seed in seeds:
        for rule, setting in rules_of(method).items():
            common = f"{METHODS[method]} seed={seed} {setting}".strip()
            jobs[f"{method}-clean-{rule}-s{seed}"] = common
            for attack in ATTACKS[method]:
                jobs[f"{method}-{attack}-{rule}-s{seed}"] = (
                    f"{common} faults.kind={attack} faults.fraction=0.2 faults.seed={seed}"
                )
    return jobs


def attack_table(out: Path, method: str) -> str:
    head = ["attack (20% of clients)", *rules_of(method)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for attack in ("clean", *ATTACKS[method]):
        cells = []
        for rule in rules_of(method):
            accs = [
                _accuracy(p.parent)
                for p in sorted(out.glob(f"{method}-{attack}-{rule}-s*/summary.json"))
            ]
            cells.append(fmt(accs) + (f" ({len(accs)} seed)" if len(accs) == 1 else ""))
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- local DP -----------------------------------------------------------------------------------
DP = {
    "none": "",
    # Budgets far beyond any meaningful privacy: where per-update local DP starts to let FL-TAC
    # learn again (noise std 4.845 / epsilon on each of an adapter's ~11k coordinates).
    "eps5000": "privacy.local_dp=true privacy.epsilon=5000",
    "eps1000": "privacy.local_dp=true privacy.epsilon=1000",
    "eps200": "privacy.local_dp=true privacy.epsilon=200",
    "eps50": "privacy.local_dp=true privacy.epsilon=50",
    "eps10": "privacy.local_dp=true privacy.epsilon=10",
}


def dp_jobs(seeds: list[int]) -> dict[str, str]:
    return {
        f"fltac-dp-{name}-s{seed}": f"seed={seed} {s}".strip()
        for seed in seeds
        for name, s in DP.items()
    }


def _empty_rounds(run: Path) -> int:
    """Rounds in which no training reply arrived valid (a run that never trained shows it)."""
    return sum(r.get("replies_ok", 0) == 0 for r in _rounds(run))


def dp_table(out: Path) -> str:
    lines = [
        "| local DP (clip 1.0, delta 1e-5) | noise std | mean accuracy | rounds without a reply |",
        "|---|---|---|---|",
    ]
    for name in DP:
        runs = sorted(out.glob(f"fltac-dp-{name}-s*/summary.json"))
        privacy = _summary(runs[0].parent)["privacy"] if runs else None
        std = f"{privacy['noise_std']:.4f}" if privacy else "0"
        empty = sum(_empty_rounds(p.parent) for p in runs)
        lines.append(f"| {name} | {std} | {fmt([_accuracy(p.parent) for p in runs])} | {empty} |")
    return "\n".join(lines)


def run_jobs(out: Path, jobs: dict[str, str], parallel: int) -> None:
    """Run ``jobs``, ``parallel`` ClientApps training at once; hang runs on a SuperLink of their
    own (``flwr-home-hang``), so that a second copy of this script can run them beside the rest.

    A hung ClientApp holds its simulation worker while it sleeps: a hang run gets one worker more
    per hung client, so that the healthy ones still train ``parallel`` at a time (one worker per
    SuperNode made 10 ClientApps train at once on 2 cores, and rounds 4x slower).
    """
    placed, federation, threads = parallel_clients(jobs, parallel)
    threads = threads or 1  # one worker per hung client below, whatever else runs
    hung = {name: o for name, o in placed.items() if "faults.kind=hang" in o}
    run_all(out, {n: o for n, o in placed.items() if n not in hung}, federation_config=federation)
    by_count: dict[int, dict[str, str]] = {}
    for name, o in hung.items():
        fraction = float(re.search(r"faults\.fraction=([0-9.]+)", o).group(1))  # type: ignore[union-attr]
        by_count.setdefault(round(fraction * NUM_CLIENTS), {})[name] = o
    for count, group in by_count.items():
        workers = parallel + count
        federation = f"client-resources-num-cpus={threads} init-args-num-cpus={workers * threads}"
        run_all(out, group, federation_config=federation, home="flwr-home-hang")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["resume", "faults", "attacks", "dp"])
    parser.add_argument("--out", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--method", choices=list(METHODS), default="fltac", help="faults and attacks"
    )
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, help="run only jobs named so")
    parser.add_argument(
        "--parallel-clients",
        type=int,
        default=1,
        help="ClientApps trained at once, each on cores/N threads (same seeds, same budget)",
    )
    args = parser.parse_args()
    out = args.out / args.what
    if args.what == "resume":
        if args.table_only:  # the comparisons of the last run of this command
            print(resume_table(json.loads((out / "resume.json").read_text())))
            return
        results = [kill_and_resume(out, m, s) for s in args.seeds for m in METHODS]
        (out / "resume.json").write_text(json.dumps(results, indent=2))
        print(resume_table(results))
        return
    jobs, table = {
        "faults": (fault_jobs(args.seeds, args.method), lambda: fault_table(out, args.method)),
        "attacks": (attack_jobs(args.seeds, args.method), lambda: attack_table(out, args.method)),
        "dp": (dp_jobs(args.seeds), lambda: dp_table(out)),
    }[args.what]
    if args.only:
        jobs = {name: o for name, o in jobs.items() if name in args.only}
    if not args.table_only:
        run_jobs(out, jobs, args.parallel_clients)
    print(table())


if __name__ == "__main__":
    main()
