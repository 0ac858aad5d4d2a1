"""``fedspecialists-sweep``: Hydra's command line over the app, each job a real Flower simulation.

Examples::

    fedspecialists-sweep method=fedit seed=1                     # one run
    fedspecialists-sweep --multirun method=fltac,fedit lora.rank=1,4,16 seed=0,1,2
    fedspecialists-sweep --multirun +experiment=rank_sweep method=fltac,fedit \\
        lora.rank=1,2,4,8,16 seed=0,1,2

The config is the same ``conf/`` that ``flwr run .`` composes. Every job of a sweep is composed and
validated (:func:`fedspecialists.config.load_config`) before the first one runs, so an unknown
key or a bad value stops the sweep at once, with the key named. Each job then runs the app with
``flwr run`` on a local simulation SuperLink that this process starts once and stops (by PID) at
exit; the job's run folder is ``<hydra sweep dir>/<job number>/run``. A job whose run fails is
reported as failed (its status read from the SuperLink) and the sweep goes on.

A sweep (or one run) cut short goes on with the same command plus ``resume=<folder>``: for
``--multirun`` the folder is the sweep's (``<sweep dir>``), and each job's run in it is skipped
when it completed, resumed from its checkpoint when it has one, and run anew otherwise; for a
single run the folder is the run's own.

``fedspecialists-report <sweep dir>`` turns the run folders into tables and plots.
"""

from __future__ import annotations

import atexit
import itertools
import json
import shlex
import signal
import sys
import time
from logging import ERROR, INFO, getLogger
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedspecialists.config import CONF_DIR, ConfigError, apply_schema, load_config
from fedspecialists.run.checkpoint import checkpointed_round
from fedspecialists.run.local import LocalSuperLink, local_superlink, run_app
from fedspecialists.run.status import read_status

logger = getLogger("fedspecialists.run.sweep")
_LINK: dict[str, Any] = {}
# Jobs in this sweep (set once they are validated) and the seconds each finished one took.
_PROGRESS: dict[str, Any] = {"total": None, "done": 0, "times": []}


def expand(overrides: list[str]) -> list[list[str]]:
    """Hydra overrides with sweeps (``a=1,2``, ``range(0,3)``) -> one override list per job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([str(override.input_line)])
    return [list(job) for job in itertools.product(*choices)]


def validate_jobs(overrides: list[str]) -> int:
    """Compose and validate every job of the sweep; raise ``ConfigError`` naming job and key."""
    jobs = expand(overrides)
    for i, job in enumerate(jobs):
        try:
            load_config(job)
        except ConfigError as exc:
            raise ConfigError(f"job {i} ({' '.join(job)}): {exc}") from exc
    return len(jobs)


def _superlink(home: Path) -> LocalSuperLink:
    """The sweep's SuperLink: started by the first job, stopped by PID when the process exits."""
    if "link" not in _LINK:
        context = local_superlink(home)
        _LINK["link"] = context.__enter__()
        atexit.register(context.__exit__, None, None, None)
    link: LocalSuperLink = _LINK["link"]
    return link


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Run one job (called by ``hydra.main``): ``flwr run`` the app, read its real status."""
    from hydra.core.hydra_config import HydraConfig

    started = time.time()
    hydra = HydraConfig.get()
    job_dir = Path(hydra.runtime.output_dir)
    checked = apply_schema(cfg)
    own = ("output.root=", "output.name=", "resume=")
    task = [o for o in hydra.overrides.task if not o.startswith(own)]
    multirun = hydra.mode is not None and hydra.mode.name == "MULTIRUN"
    run_dir = job_dir / "run"
    if checked.resume:
        run_dir = resumed_job_folder(Path(str(checked.resume)), hydra.job.num if multirun else None)
    result = {
        "job": hydra.job.num if multirun else 0,
        "overrides": task,
        "run_dir": str(run_dir),
    }
    if read_status(run_dir)["status"] == "completed" and multirun:
        logger.log(INFO, "job %s already completed: %s", result["job"], run_dir)
        _log_progress(None)
        return {**result, "status": "finished:completed", "run_id": None, "skipped": True}
    resume = [f"resume={run_dir}"] if checkpointed_round(run_dir) else []
    overrides = shlex.join(
        [*task, f"output.root={run_dir.parent}", f"output.name={run_dir.name}", *resume]
    )
    sweep_dir = Path(hydra.sweep.dir) if multirun else job_dir
    link = _superlink(sweep_dir / ".flwr-home")
    outcome = run_app(
        link,
        overrides=overrides,
        num_supernodes=checked.federation.num_clients,
        timeout_s=checked.federation.reply_timeout_s * checked.num_rounds,
    )
    status = outcome.status
    result.update({"status": status, "run_id": outcome.run_id, "resumed": bool(resume)})
    (job_dir / "job.json").write_text(json.dumps(result, indent=2))
    (job_dir / "flwr.log").write_text(outcome.log)
    if status == "finished:completed":
        logger.log(INFO, "job %s completed: %s", result["job"], run_dir)
    else:
        logger.log(ERROR, "job %s FAILED (%s); log in %s", result["job"], status, job_dir)
    _log_progress(time.time() - started)
    return result


def _log_progress(seconds: float | None) -> None:
    """``sweep: 3 of 8 jobs done, 5 left, about 20 min left`` after each job (``seconds``:
    how long it ran; ``None``: skipped, done before, which does not count in the estimate)."""
    from server_app.outputs import time_left_text

    _PROGRESS["done"] += 1
    if seconds is not None:
        _PROGRESS["times"].append(seconds)
    total = _PROGRESS["total"]
    if total is None:
        return
    left = max(0, int(total) - _PROGRESS["done"])
    logger.log(
        INFO,
        "sweep: %s of %s jobs done, %s left, %s",
        _PROGRESS["done"],
        total,
        left,
        time_left_text(_PROGRESS["times"], left),
    )


def resumed_job_folder(folder: Path, job: int | None) -> Path:
    """The run folder a resumed job goes on in: ``<sweep dir>/<job>/run`` for job ``job`` of a
    multirun sweep, the folder itself for a single run."""
    folder = folder.expanduser().resolve()
    return folder / str(job) / "run" if job is not None else folder


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Console entry point: validate every job, then hand the command line to Hydra."""
    import hydra

    args = sys.argv[1:]
    overrides = [
        a for a in args if not a.startswith("-") and "=" in a and not a.startswith("hydra.")
    ]
    try:
        jobs = validate_jobs(overrides) if "--multirun" in args or "-m" in args else None
        if jobs is None:
            load_config(overrides)
    except ConfigError as exc:
        print(f"fedspecialists-sweep: refused before running anything: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if jobs is not None:
        print(f"fedspecialists-sweep: {jobs} job(s) validated", file=sys.stderr)
        _PROGRESS["total"] = jobs
    # SIGTERM (and SIGINT, which a background shell job ignores) end the sweep through
    # SystemExit, so the atexit hook stops the SuperLink and its simulation by PID.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run_job)()


if __name__ == "__main__":
    main()
