"""Checkpoints, the run status and client identities: what a resumed run stands on."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FakeGrid
from flwr.app import Message, MessageType
from numpy.testing import assert_array_equal
from test_moe_strategy import GATES, _reply, _round, _strategy

from fedspecialists.config import ConfigError, load_config
from fedspecialists.protocol.fedmoe_da import Instruction
from fedspecialists.protocol.identity import IdentityQuery, IdentityReply
from fedspecialists.run.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpointed_round,
    load_checkpoint,
    save_checkpoint,
)
from fedspecialists.run.status import STALE_AFTER_S, StatusFile, read_status
from server_app.outputs import RunRecorder, resumed_run
from strategies.common import sample_round_nodes


def _checkpoint(k: int) -> Checkpoint:
    arrays: dict[str, np.ndarray] = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3) * k,
        "b": np.ones(2, np.int64),
    }
    return Checkpoint(k, arrays, {"round": k, "nested": {"1": [0.1, 1e-300]}})


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    assert checkpointed_round(tmp_path) == 0  # nothing committed yet
    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2))
    assert checkpointed_round(tmp_path) == 2
    back = load_checkpoint(tmp_path)
    assert back.round == 2
    assert back.state == {"round": 2, "nested": {"1": [0.1, 1e-300]}}  # floats exact in JSON
    assert_array_equal(back.arrays["a"], np.array([[0, 2, 4], [6, 8, 10]], np.float32))
    assert back.arrays["b"].dtype == np.int64
    # Only the committed round's tensors are kept; no temporary file is left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "checkpoint.json",
        "round-2.safetensors",
    ]


def test_checkpoint_keeps_a_scalar_and_a_transposed_array(tmp_path: Path) -> None:
    arrays = {"scalar": np.array(2.5, np.float32), "t": np.arange(6.0).reshape(2, 3).T}
    save_checkpoint(tmp_path, Checkpoint(1, arrays, {}))
    back = load_checkpoint(tmp_path).arrays
    assert back["scalar"].shape == ()  # not (1,)
    assert back["scalar"] == np.float32(2.5)
    assert_array_equal(back["t"], [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])


def test_a_crash_before_the_commit_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))
    # A crash after the new tensors were written, before checkpoint.json was replaced:
    (tmp_path / "checkpoint" / "round-2.safetensors").write_bytes(b"half-written")
    assert load_checkpoint(tmp_path).round == 1


def test_damaged_or_missing_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _checkpoint(3))
    tensors = tmp_path / "checkpoint" / "round-3.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_a_running_status_whose_heartbeat_stopped_reads_as_interrupted(tmp_path: Path) -> None:
    status = StatusFile(tmp_path)
    status.set("running")
    status.update(last_round=2)
    written = json.loads((tmp_path / "status.json").read_text())
    assert written["status"] == "running" and written["last_round"] == 2
    beat = written["heartbeat"]
    assert read_status(tmp_path, now=beat + 1)["status"] == "running"
    stale = read_status(tmp_path, now=beat + STALE_AFTER_S + 5)
    assert stale["status"] == "interrupted" and stale["stale_s"] == pytest.approx(STALE_AFTER_S + 5)
    status.set("completed")
    done = json.loads((tmp_path / "status.json").read_text())
    assert done["status"] == "completed" and "heartbeat" not in done and done["last_round"] == 2
    assert read_status(tmp_path, now=beat + 10 * STALE_AFTER_S)["status"] == "completed"
    assert read_status(tmp_path / "nowhere")["status"] == "unknown"


def test_resume_refuses_other_overrides_naming_the_keys(tmp_path: Path) -> None:
    cfg = load_config(f"output.root={tmp_path} output.name=run seed=3")
    (tmp_path / "run").mkdir()
    RunRecorder(tmp_path / "run", cfg).set_status("failed")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resumed_run(
            load_config(f"output.root={tmp_path} output.name=run seed=3 resume={tmp_path}/run")
        )
    save_checkpoint(tmp_path / "run", _checkpoint(2))
    with pytest.raises(ConfigError, match=r"\['lora.rank', 'seed'\]"):
        resumed_run(
            load_config(
                f"output.root={tmp_path} output.name=run seed=4 lora.rank=2 resume={tmp_path}/run"
            )
        )
    with pytest.raises(ConfigError, match="not a run folder"):
        resumed_run(load_config(f"resume={tmp_path}/elsewhere"))
    # The same overrides, and more rounds than the run had: accepted.
    folder, checkpoint = resumed_run(
        load_config(
            f"output.root={tmp_path} output.name=run seed=3 num_rounds=9 resume={tmp_path}/run"
        )
    )
    assert folder == tmp_path / "run" and checkpoint.round == 2


def test_resume_accepts_a_run_folder_from_before_a_key_was_added(tmp_path: Path) -> None:
    """A run written before ``robust.drop_opposed_updates`` existed resumes while the new key
    stays at its default, and is refused (naming it) when it is set otherwise."""
    cfg = load_config(f"output.root={tmp_path} output.name=run")
    run = tmp_path / "run"
    run.mkdir()
    RunRecorder(run, cfg).set_status("failed")
    save_checkpoint(run, _checkpoint(2))
    older = (run / "config.yaml").read_text().replace("  drop_opposed_updates: false\n", "")
    assert "drop_opposed_updates" not in older
    (run / "config.yaml").write_text(older)
    folder, _ = resumed_run(load_config(f"output.root={tmp_path} output.name=run resume={run}"))
    assert folder == run
    with pytest.raises(ConfigError, match=r"robust\.drop_opposed_updates"):
        resumed_run(
            load_config(
                f"output.root={tmp_path} output.name=run resume={run} "
                "robust.drop_opposed_updates=true"
            )
        )


def test_a_resumed_recorder_keeps_the_rounds_up_to_the_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(f"output.root={tmp_path} output.name=run")
    (tmp_path / "run").mkdir()
    recorder = RunRecorder(tmp_path / "run", cfg)
    for r in (1, 2, 3):  # round 3 was cut short by the crash after its line was written
        recorder.on_round_end({"round": r, "mean_accuracy": r / 10})
    again = RunRecorder(tmp_path / "run", cfg, _checkpoint(2))
    assert [x["round"] for x in again.rounds] == [1, 2]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["resumed_after_round"] == 2


class IdentifyingGrid(FakeGrid):
    """A grid whose nodes answer the identity query with their client ids."""

    def __init__(self, clients: dict[int, int]) -> None:
        super().__init__(list(clients))
        self.clients = clients
        self.queries = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.replies = []
        for message in messages:
            assert message.metadata.message_type == MessageType.QUERY
            assert IdentityQuery.is_query(message.content)
            self.queries += 1
            client = self.clients[message.metadata.dst_node_id]
            self.replies.append(Message(IdentityReply(client).to_record(), reply_to=message))
        return [r.metadata.reply_to_message_id for r in self.replies]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [r for r in self.replies if r.metadata.reply_to_message_id in set(message_ids)]


def test_nodes_are_asked_once_and_a_duplicate_client_id_keeps_its_node_id() -> None:
    strategy = _strategy()
    grid = IdentifyingGrid({501: 0, 77: 1, 9000: 1})
    strategy.identify_nodes(1, grid, timeout=5)
    assert strategy.client_ids == {77: 1, 501: 0, 9000: 9000}  # asked in node order: 77 first
    strategy.identify_nodes(2, grid, timeout=5)
    assert grid.queries == 3  # nobody asked twice


def test_a_restarted_node_takes_its_client_id_back_from_the_node_that_left() -> None:
    strategy = _strategy()
    strategy.identify_nodes(1, IdentifyingGrid({501: 0, 77: 1}), timeout=5)
    # Node 77's SuperNode died and came back as node 8000: it is client 1 again.
    strategy.identify_nodes(2, IdentifyingGrid({501: 0, 8000: 1}), timeout=5)
    assert strategy.client_ids == {501: 0, 8000: 1}
    assert strategy.client_of(8000) == 1


def test_the_same_clients_are_sampled_whatever_their_node_ids() -> None:
    first = {10: 0, 20: 1, 30: 2, 40: 3, 50: 4}
    second = {999: 0, 5: 1, 123: 2, 7: 3, 60: 4}  # the same clients in another federation
    drawn = [
        [ids[n] for n in sample_round_nodes(list(ids), 0.4, seed=3, client_of=ids.__getitem__)]
        for ids in (first, second)
    ]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 2


def test_a_restored_fedmoe_da_strategy_plans_as_the_original_under_new_node_ids() -> None:
    """Round 1 under node ids 1-3, checkpoint; round 2 by the original and by a fresh strategy
    restored from it whose clients came back as nodes 41-43: the same plans and backbone."""
    original = _strategy(peer_root="/stores")
    original.client_ids = {1: 0, 2: 1, 3: 2}
    _round(original, 1, lambda n, m: _reply(m, float(n), GATES[n]))
    arrays, state = original.checkpoint()
    restored = _strategy(peer_root="/stores")
    restored.restore(arrays, json.loads(json.dumps(state)))  # through JSON, as on disk
    restored.client_ids = {41: 0, 42: 1, 43: 2}

    def reply(n: int, m: Message) -> Message:
        node = n if n < 40 else n - 40
        return _reply(m, float(node) + 0.5, GATES[node], server_round=2)

    plans_a = _round(original, 2, reply)
    plans_b = _round(restored, 2, reply, nodes=(41, 42, 43))
    for node in (1, 2, 3):
        a = Instruction.from_record(plans_a[node].content)
        b = Instruction.from_record(plans_b[node + 40].content)
        assert a.plans == b.plans and a.plans  # same sources, weights, hashes, addresses
        assert a.grant_key == b.grant_key  # the same signing key: owners trust it already
    assert_array_equal(original.shared["backbone.w"], restored.shared["backbone.w"])
    assert original.matrix_ids == restored.matrix_ids == ["0/0", "0/1", "1/0", "1/1", "2/0", "2/1"]


def test_what_a_round_files_apart_is_reported_once_and_not_kept_in_the_history() -> None:
    """A round's A (FedMoE-DA) or embedding (FL-TAC, or a plugin's ``extra``) goes to its own
    file through the report; the history in memory and the checkpoint keep the rest only."""
    from strategies.common import RoundBookkeeping
    from strategies.fedmoe_da import FedMoEDARoundRecord

    class Rounds(RoundBookkeeping[FedMoEDARoundRecord]):
        def method_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            return {}, {}

        def method_restore(self, arrays: Any, state: Any) -> None:
            pass

    reported: list[dict[str, Any]] = []
    rounds = Rounds()
    rounds.init_rounds(FedMoEDARoundRecord, 0, 1.0, 1, 1e4, reported.append)
    for r in (1, 2):
        rounds.open_round(r)
        rounds.record.aggregation = {"expert_ids": ["0/0", "1/0"], "matrix": [[1.0, 0.0]] * 2}
        rounds.record.extra["embedding"] = {"x": [0.0, 1.0]}
        rounds.record.mean_accuracy = r / 10
        rounds.close_round()
    assert [x["aggregation"]["expert_ids"] for x in reported] == [["0/0", "1/0"]] * 2
    assert all("embedding" in x for x in reported)
    _, state = rounds.checkpoint()
    for kept in state["rounds"]["history"]:
        assert "aggregation" not in kept and "embedding" not in kept
    assert [x["mean_accuracy"] for x in state["rounds"]["history"]] == [0.1, 0.2]


def test_the_recorder_keeps_only_the_last_aggregation_and_files_every_one(tmp_path: Path) -> None:
    cfg = load_config(f"output.root={tmp_path} output.name=run")
    (tmp_path / "run").mkdir()
    recorder = RunRecorder(tmp_path / "run", cfg)
    for r in (1, 2, 3):
        recorder.on_round_end({"round": r, "aggregation": {"expert_ids": [f"{r}/0"]}})
    assert recorder.last_aggregation == {"round": 3, "expert_ids": ["3/0"]}
    lines = (tmp_path / "run" / "aggregation.jsonl").read_text().splitlines()
    assert [json.loads(x)["expert_ids"] for x in lines] == [["1/0"], ["2/0"], ["3/0"]]
    again = RunRecorder(tmp_path / "run", cfg, _checkpoint(2))  # resumed after round 2
    assert again.last_aggregation == {"round": 2, "expert_ids": ["2/0"]}
