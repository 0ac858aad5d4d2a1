"""End-to-end Flower simulations: a real SuperLink, real ClientApps, real (small) data.

The SuperLink is started and stopped by PID here; each run's outcome is read from the SuperLink
(``flwr ls``) and from the files the ServerApp writes, never from ``flwr run``'s exit code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedspecialists.localrun import LocalSuperLink, local_superlink, run_app

pytestmark = pytest.mark.e2e

TINY = "model=tiny_bert suite=tiny_text num_rounds=2 federation.num_clients=3"


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSuperLink]:
    with local_superlink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield link
    assert link.process.poll() is not None, "the SuperLink was not stopped"


def _run(link: LocalSuperLink, out: Path, name: str, extra: str = "") -> Path:
    outcome = run_app(
        link,
        overrides=f"{TINY} output.root={out} output.name={name} {extra}",
        num_supernodes=3,
        timeout_s=900,
    )
    assert outcome.status == "finished:completed", outcome.log[-4000:]
    return out / name


def test_fltac_two_rounds_write_every_output(superlink: LocalSuperLink, tmp_path: Path) -> None:
    run = _run(superlink, tmp_path, "fltac")
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["accuracy"]) == {"bbc_topic", "tweet_sentiment", "movie_sentiment"}
        assert all(0.0 <= a <= 1.0 for a in record["accuracy"].values())
        assert record["bytes"]["train_up"] > 0 and record["bytes"]["train_down"] > 0
        assert -1.0 <= record["clustering_agreement"] <= 1.0
        assert record["replies_ok"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "fltac"
    assert summary["total_bytes_up"] == rounds[-1]["bytes"]["cumulative"]["train_up"]
    assert len(summary["clustering_agreement_per_round"]) == 2
    for plot in ("accuracy_per_task.png", "cumulative_bytes.png", "adapter_embeddings.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    index = json.loads((run / "adapters" / "index.json").read_text())
    assert len(index) == 3  # K = number of tasks
    for entry in index.values():
        folder = run / entry["path"]
        assert (folder / "adapter_config.json").exists()
        assert (folder / "adapter_model.safetensors").exists()
    embeddings = (run / "embeddings.jsonl").read_text().splitlines()
    assert len(embeddings) == 2


@pytest.mark.parametrize("method", ["fedit", "oracle", "local"])
def test_baselines_complete(superlink: LocalSuperLink, tmp_path: Path, method: str) -> None:
    run = _run(superlink, tmp_path, method, extra=f"method={method}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method
    assert summary["mean_accuracy"] is not None
    if method == "fedit":
        assert summary["lora_rank"] == 16
        assert list(summary["global_adapters"]) == ["global"]
    if method == "oracle":
        assert summary["clustering_agreement_per_round"] == [1.0, 1.0]
    if method == "local":
        # Nothing is aggregated: after round 1 the server sends no adapters at all.
        rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert rounds[1]["bytes"]["train_down"] < rounds[0]["bytes"]["train_down"]


def test_bad_config_is_refused_before_training(superlink: LocalSuperLink, tmp_path: Path) -> None:
    outcome = run_app(
        superlink,
        overrides=f"{TINY} output.root={tmp_path} lora.rank=0",
        num_supernodes=3,
        timeout_s=600,
    )
    assert outcome.status == "finished:failed"
    assert "lora.rank" in outcome.log
    assert not list(tmp_path.iterdir())  # refused before a run folder was even made
