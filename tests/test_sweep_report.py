"""Sweeps (Hydra command line, one Flower simulation per job) and reports from run folders."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedspecialists.config import ConfigError
from fedspecialists.run.checkpoint import checkpointed_round
from fedspecialists.run.report import find_runs, mean_std, report
from fedspecialists.run.status import read_status
from fedspecialists.run.sweep import expand, validate_jobs


def test_expand_is_the_cartesian_product_of_sweeps() -> None:
    jobs = expand(["method=fltac,fedit", "lora.rank=1,4", "num_rounds=2", "seed=range(0,2)"])
    assert len(jobs) == 8
    assert jobs[0] == ["method=fltac", "lora.rank=1", "num_rounds=2", "seed=0"]
    assert ["method=fedit", "lora.rank=4", "num_rounds=2", "seed=1"] in jobs


@pytest.mark.parametrize(
    ("sweep", "key"),
    [
        (["lora.rank=1,0"], "lora.rank"),
        (["partition.alpha=0.5,0"], "partition.alpha"),
        (["method=fedmoe_da", "fedmoe_da.num_peers=2,-1"], "fedmoe_da.num_peers"),
        (["method=fedmoe_da", "fedmoe_da.tau=1,0"], "fedmoe_da.tau"),
        (["federation.fraction_train=0.5,1.5"], "federation.fraction_train"),
        (["seed=0,1", "lora.no_such=1"], "lora.no_such"),
    ],
)
def test_every_job_is_validated_before_any_runs(sweep: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_jobs(sweep)
    assert key in str(info.value) and "job" in str(info.value)


def test_cli_refuses_a_bad_sweep_before_running(tmp_path: Path) -> None:
    done = subprocess.run(
        ["fedspecialists-sweep", "--multirun", "lora.rank=4,0", f"output.root={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "lora.rank" in done.stderr and "refused before running anything" in done.stderr
    assert not list(tmp_path.iterdir())


def _fake_run(
    root: Path,
    name: str,
    method: str,
    rank: int,
    seed: int,
    acc: dict[str, float],
    status: str = "completed",
) -> None:
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "method": {"name": method},
        "lora": {"rank": rank},
        "seed": seed,
        "suite": {"name": "toy"},
        "fedmoe_da": {"num_peers": 5},
    }
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (run / "status.json").write_text(json.dumps({"status": status}))
    if status != "completed":
        return
    mean = sum(acc.values()) / len(acc)
    rounds = [
        {
            "round": 1,
            "accuracy": {k: v / 2 for k, v in acc.items()},
            "mean_accuracy": mean / 2,
            "bytes": {"cumulative": {"train_up": 1_000_000, "train_down": 1_000_000}},
        },
        {
            "round": 2,
            "accuracy": acc,
            "mean_accuracy": mean,
            "bytes": {"cumulative": {"train_up": 2_000_000, "train_down": 2_000_000}},
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {
        "method": method,
        "mean_accuracy": mean,
        "per_task_accuracy": acc,
        "total_bytes_up": 2_000_000,
        "total_bytes_down": 2_000_000,
        "adapter_parameters": 1000 * rank,
    }
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_on_hand_made_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _fake_run(runs, "a", "fltac", 1, 0, {"t1": 0.9, "t2": 0.7})
    _fake_run(runs, "b", "fltac", 1, 1, {"t1": 0.7, "t2": 0.5})
    _fake_run(runs, "c", "fedit", 16, 0, {"t1": 0.6, "t2": 0.4})
    _fake_run(runs, "d", "fedit", 16, 1, {}, status="failed")
    found = report([runs], tmp_path / "out")
    assert found["runs"] == 3 and found["skipped"] == 1
    text = (tmp_path / "out" / "report.md").read_text()
    # FL-TAC r1 over seeds 0, 1: t1 = 0.8 ± 0.141, t2 = 0.6 ± 0.141, mean 0.7 ± 0.141.
    assert "| toy | fltac | r1 | 0.800 ± 0.141 | 0.600 ± 0.141 | 0.700 ± 0.141 | 1,000 |" in text
    assert "| toy | fedit | r16 | 0.600 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 | 16,000 |" in text
    assert "4.00 ± 0.00" in text  # MB up + down
    assert "failed" in text and "/d`" in text
    with (tmp_path / "out" / "report.csv").open() as fh:
        rows = {(r["method"], r["setting"]): r for r in csv.DictReader(fh)}
    assert float(rows[("fltac", "r1")]["mean_accuracy"]) == pytest.approx(0.7)
    assert float(rows[("fltac", "r1")]["mean_accuracy_std"]) == pytest.approx(0.1414213)
    assert rows[("fltac", "r1")]["seeds"] == "2"
    for plot in ("accuracy_vs_rank.png", "accuracy_vs_bytes.png", "per_task_rounds.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 1000
    assert mean_std([1.0]) == (1.0, 0.0)


@pytest.mark.e2e
def test_sweep_runs_every_job_and_survives_a_failing_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            "fedspecialists-sweep",
            "--multirun",
            "model=tiny_bert",
            "suite=tiny_text",
            "num_rounds=1",
            "federation.num_clients=3",
            "model.name_or_path=/nonexistent/model,builtin:all-MiniLM-L6-v2",
            "seed=3",
            f"output.root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "sweeps").iterdir()
    jobs = [json.loads((sweep / str(i) / "job.json").read_text()) for i in range(2)]
    for job in jobs:  # job 0: the bad model (failed at run time); job 1: fine
        bad = "nonexistent" in job["overrides"][-2]
        assert job["status"] == ("finished:failed" if bad else "finished:completed"), job
    runs, skipped = find_runs([sweep])
    assert [r.seed for r in runs] == [3] and len(skipped) == 1
    found = report([sweep], sweep / "report")
    text = (sweep / "report" / "report.md").read_text()
    assert found["runs"] == 1 and "| 3 |" in text
    # Progress after each job, failed or not: done, left and the estimate (Hydra's job log).
    logged = done.stdout + done.stderr
    assert "sweep: 1 of 2 jobs done, 1 left, about " in logged, logged[-3000:]
    assert "sweep: 2 of 2 jobs done, 0 left, done" in logged
    # The sweep's SuperLink (its database lives in the sweep folder) stopped with the sweep.
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [p for p in processes.splitlines() if "flower-superlink" in p and str(sweep) in p]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sweep_cut_short_goes_on_with_resume(tmp_path: Path) -> None:
    """A two-job sweep stopped (SIGTERM, as Ctrl-C) once job 1 checkpointed round 1; the same
    command plus ``resume=<sweep dir>`` skips job 0 (completed) and resumes job 1 after its
    checkpointed round, in the first sweep's folder."""
    args = [
        "fedspecialists-sweep",
        "--multirun",
        "model=tiny_bert",
        "suite=tiny_text",
        "num_rounds=3",
        "federation.num_clients=3",
        "seed=0,1",
        f"output.root={tmp_path}",
    ]
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        try:
            index = tmp_path / "sweeps"
            deadline = time.time() + 900
            while not [p for p in index.glob("*/1/run") if checkpointed_round(p) >= 1]:
                assert time.time() < deadline and first.poll() is None, "job 1 never got going"
                time.sleep(0.1)
            first.send_signal(signal.SIGTERM)  # the sweep stops its SuperLink by PID on the way out
            first.wait(timeout=120)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    (sweep,) = (tmp_path / "sweeps").iterdir()
    assert read_status(sweep / "1" / "run")["status"] != "completed"
    job0 = (sweep / "0" / "run" / "summary.json").read_bytes()
    time.sleep(1.1)  # Hydra names sweep folders by the second
    done = subprocess.run([*args, f"resume={sweep}"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sweep / "0" / "run" / "summary.json").read_bytes() == job0  # skipped, not rerun
    (second,) = [p for p in (tmp_path / "sweeps").iterdir() if p != sweep]
    assert not (second / "0" / "job.json").exists()
    job1 = json.loads((second / "1" / "job.json").read_text())
    assert job1["status"] == "finished:completed" and job1["resumed"], job1
    status = json.loads((sweep / "1" / "run" / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed_after_round"] >= 1
    rounds = (sweep / "1" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rounds] == [1, 2, 3]
