"""Kill a run in the middle of a round, resume it, and end exactly where an uninterrupted run ends.

Real Flower simulations: the SuperLink (with the ServerApp and every ClientApp under it) is
stopped by its process groups while round 3 runs, a fresh SuperLink resumes the run from its
folder (``resume=<folder>``), and the final metrics and tensors are compared with those of a
run that was never interrupted, bit for bit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedspecialists.run.checkpoint import checkpointed_round
from fedspecialists.run.local import local_superlink, run_app, submit_run
from fedspecialists.run.status import STALE_AFTER_S, read_status

pytestmark = pytest.mark.e2e

# Enough local steps that a round lasts seconds: the kill must land inside round 3.
FLTAC = "model=tiny_bert suite=tiny_text num_rounds=3 federation.num_clients=3 train.local_steps=40"
MOE = (
    "method=fedmoe_da num_rounds=3 federation.num_clients=3 partition.train_per_client=60 "
    "partition.test_per_client=30 moe.channels=[4] moe.expert_hidden=16 "
    "moe.global_test_per_domain=20 fedmoe_da.num_peers=2 train.local_steps=150"
)
VARYING = ("round_time_s", "wall_time_s", "aggregate_s", "per_node", "cumulative_per_node")


def _stable(value: Any) -> Any:
    """A metrics record without what may differ between runs: times, per-node-id entries and
    the identity queries' bytes (a resumed run asks its nodes again, checked on its own)."""
    if isinstance(value, dict):
        return {
            k: _stable(v)
            for k, v in value.items()
            if k not in VARYING and not k.startswith("identify_")
        }
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _metrics(run: Path) -> list[Any]:
    return [_stable(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _uninterrupted(home: Path, overrides: str) -> None:
    with local_superlink(home) as link:
        outcome = run_app(link, overrides, num_supernodes=3, timeout_s=900)
    assert outcome.status == "finished:completed", outcome.log[-4000:]


def _kill_in_round_3(home: Path, overrides: str, run: Path) -> None:
    """Submit the run and crash it once round 2 is checkpointed (round 3 has begun)."""
    with local_superlink(home) as link:
        submit_run(link, overrides, num_supernodes=3)
        deadline = time.time() + 600
        while checkpointed_round(run) < 2:
            assert time.time() < deadline, "round 2 never completed"
            assert link.alive()
            time.sleep(0.1)
        link.crash()  # SIGKILL of the SuperLink's process groups: ServerApp, ClientApps
    assert checkpointed_round(run) == 2, "killed too late: round 3 completed"


def _resume_equals_uninterrupted(
    tmp_path: Path, base: str, exact_down_bytes: bool = True
) -> tuple[Path, Path]:
    # Names of one length: FedMoE-DA's messages carry the run folder's path (peer stores).
    whole, cut = tmp_path / "run-a", tmp_path / "run-b"
    _uninterrupted(tmp_path / "home-1", f"{base} output.root={tmp_path} output.name=run-a")
    overrides = f"{base} output.root={tmp_path} output.name=run-b"
    _kill_in_round_3(tmp_path / "home-2", overrides, cut)
    # The killed run's folder says it is not running any more (once its heartbeat is stale).
    written = json.loads((cut / "status.json").read_text())["status"]
    later = time.time() + STALE_AFTER_S + 1
    assert read_status(cut, now=later)["status"] == (
        "interrupted" if written == "running" else written
    )
    assert read_status(cut, now=later)["status"] in ("interrupted", "failed")
    with local_superlink(tmp_path / "home-3") as link:
        outcome = run_app(link, f"{overrides} resume={cut}", num_supernodes=3, timeout_s=900)
    assert outcome.status == "finished:completed", outcome.log[-4000:]
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed_after_round"] == 2
    assert [r["round"] for r in _metrics(cut)] == [1, 2, 3]
    if exact_down_bytes:
        assert _metrics(cut) == _metrics(whole)
    else:
        _equal_but_grants(_metrics(cut), _metrics(whole))
    # The one difference: the resumed run met its nodes anew and asked who they are (round 3).
    asked = [json.loads(x)["bytes"].get("identify_down", 0) for x in (cut / "metrics.jsonl").open()]
    assert asked[0] > 0 and asked[1] == 0 and asked[2] == asked[0]
    return whole, cut


def _equal_but_grants(cut: list[Any], whole: list[Any]) -> None:
    """Equal records, but for the bytes sent down: FedMoE-DA's per-round grants carry the
    node id and an expiry time, whose digits vary with the federation and the clock."""
    for a, b in zip(cut, whole, strict=True):
        down = [k for k in a["bytes"] if k.endswith("_down")]
        for key in down:
            assert abs(a["bytes"][key] - b["bytes"][key]) <= 0.01 * b["bytes"][key], key
        trimmed = [
            {**r, "bytes": {k: v for k, v in r["bytes"].items() if k not in down}} for r in (a, b)
        ]
        cumulative = [r["bytes"].pop("cumulative") for r in trimmed]
        assert trimmed[0] == trimmed[1]
        assert {k: v for k, v in cumulative[0].items() if not k.endswith("_down")} == {
            k: v for k, v in cumulative[1].items() if not k.endswith("_down")
        }


def _same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert sorted(left) == sorted(right)
    for key in left:
        assert np.array_equal(left[key], right[key]), key


def test_fltac_killed_in_round_3_and_resumed_ends_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    whole, cut = _resume_equals_uninterrupted(tmp_path, FLTAC)
    index = json.loads((whole / "adapters" / "index.json").read_text())
    assert index == json.loads((cut / "adapters" / "index.json").read_text())
    for entry in index.values():
        name = Path(entry["path"]) / "adapter_model.safetensors"
        _same_tensors(whole / name, cut / name)


@pytest.mark.slow
def test_fedmoe_da_killed_in_round_3_and_resumed_ends_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    whole, cut = _resume_equals_uninterrupted(tmp_path, MOE, exact_down_bytes=False)
    _same_tensors(whole / "shared_model.safetensors", cut / "shared_model.safetensors")
    mine = sorted((whole / "nodes").glob("node-*/run-*/personal.safetensors"))
    theirs = sorted((cut / "nodes").glob("node-*/run-*/personal.safetensors"))
    assert len(mine) == len(theirs) == 3
    for a, b in zip(mine, theirs, strict=True):
        assert a.parent.parent.name == b.parent.parent.name  # node-<client id>
        _same_tensors(a, b)
