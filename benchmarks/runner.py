"""What the benchmark scripts share: run named jobs on one local SuperLink, format mean ± std."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path

from fedspecialists.run.local import local_superlink, run_app


def run_all(
    out: Path,
    jobs: dict[str, str],
    num_supernodes: int = 10,
    federation_config: str = "",
    home: str = "flwr-home",
) -> None:
    """``flwr run`` each job (run-folder name -> Hydra overrides) not done yet, in order.

    One simulation SuperLink (its ``FLWR_HOME`` is ``<out>/<home>``, so that two of these can
    share ``out``) serves them all and is stopped, by PID, at the end. Each job's log goes to
    ``<out>/<name>.log``; a folder holding ``summary.json`` counts as done.
    """
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the SuperLink below is stopped by PID on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    todo = {n: o for n, o in jobs.items() if not (out / n / "summary.json").exists()}
    for name in jobs.keys() - todo.keys():
        print(f"{name}: done already", flush=True)
    if not todo:
        return
    with local_superlink(out / home) as link:
        for name, overrides in todo.items():
            started = time.time()
            outcome = run_app(
                link,
                overrides=f"{overrides} output.root={out} output.name={name}",
                num_supernodes=num_supernodes,
                federation_config=federation_config,
            )
            print(
                f"{name}: {outcome.status} in {time.time() - started:.0f}s (run {outcome.run_id})",
                flush=True,
            )
            (out / f"{name}.log").write_text(outcome.log)


def parallel_clients(jobs: dict[str, str], parallel: int) -> tuple[dict[str, str], str, int]:
    """``jobs`` set to train ``parallel`` ClientApps at once, each on cores / ``parallel``
    threads (same seeds and budget): the jobs, the federation config and the threads each."""
    if parallel <= 1:
        return jobs, "", 0
    threads = max(1, (os.cpu_count() or 1) // parallel)
    placed = {name: f"{o} train.num_threads={threads}" for name, o in jobs.items()}
    return placed, f"client-resources-num-cpus={threads}", threads


def fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` (sample std; 0 for one value) of ``values * scale``, or ``n/a``."""
    if not values:
        return "n/a"
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
