"""End-to-end runs that must fail, and say why: every client failing, a federation too small.

Real Flower simulations on a SuperLink started and stopped by PID; each outcome is read from the
SuperLink (its Control API, what ``flwr ls`` reports) and from the run folder's ``status.json``,
never from ``flwr run``'s exit code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedspecialists.run.local import LocalSuperLink, local_superlink, run_app

pytestmark = pytest.mark.e2e

TINY = "model=tiny_bert suite=tiny_text federation.num_clients=3"


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSuperLink]:
    with local_superlink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield link
    assert link.process.poll() is not None, "the SuperLink was not stopped"


def _status(run: Path) -> dict[str, object]:
    status: dict[str, object] = json.loads((run / "status.json").read_text())
    return status


def test_every_client_failing_every_message_ends_the_run_failed(
    superlink: LocalSuperLink, tmp_path: Path
) -> None:
    """Every ClientApp really raises on training and on evaluation: no round has a result."""
    outcome = run_app(
        superlink,
        overrides=(
            f"{TINY} num_rounds=2 faults.kind=crash faults.fraction=1.0 faults.evaluate=true "
            f"output.root={tmp_path} output.name=all-fail"
        ),
        num_supernodes=3,
        timeout_s=600,
    )
    assert outcome.status == "finished:failed", outcome.log[-3000:]
    run = tmp_path / "all-fail"
    status = _status(run)
    assert status["status"] == "failed"
    assert "no round produced evaluation results" in str(status["error"])
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["replies_failed"] == 3 and record["replies_ok"] == 0
        assert record["aggregated"] is False
        assert record["faults_injected"] == {"crash": 3}


def test_too_few_supernodes_fail_within_node_wait_s_naming_the_setting(
    superlink: LocalSuperLink, tmp_path: Path
) -> None:
    outcome = run_app(
        superlink,
        overrides=(
            f"{TINY} num_rounds=1 federation.node_wait_s=3 "
            f"output.root={tmp_path} output.name=too-few"
        ),
        num_supernodes=2,
        timeout_s=600,
    )
    assert outcome.status == "finished:failed", outcome.log[-3000:]
    status = _status(tmp_path / "too-few")
    assert status["status"] == "failed"
    assert "federation.num_clients=3 but only 2 SuperNode(s) connected" in str(status["error"])
    metrics = tmp_path / "too-few" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # no round was started


def test_the_status_of_a_run_nobody_can_answer_for_is_unknown(superlink: LocalSuperLink) -> None:
    """The in-process Control API poll never raises: a run the SuperLink does not know, or a
    SuperLink that does not answer, reads ``unknown`` (and polling goes on)."""
    from fedspecialists.run.control import LOCAL_PORT_ENV
    from fedspecialists.run.local import free_port, read_status

    status, details = read_status(superlink.env, 987654321)
    assert status == "unknown" and "error" in details
    nobody = {**superlink.env, LOCAL_PORT_ENV: str(free_port())}
    status, details = read_status(nobody, 1)
    assert status == "unknown" and "ConnectError" in str(details["error"])


def test_waiting_for_a_run_stops_when_its_superlink_has_vanished() -> None:
    """No poll reaches a SuperLink that is gone: the wait ends at once, saying so."""
    from fedspecialists.run.control import LOCAL_PORT_ENV
    from fedspecialists.run.local import free_port, wait_for_run

    env = {"FLWR_HOME": "/nonexistent", LOCAL_PORT_ENV: str(free_port())}
    with pytest.raises(RuntimeError, match="the SuperLink stopped while run 7 was unknown"):
        wait_for_run(env, 7, alive=lambda: False, timeout_s=5)
