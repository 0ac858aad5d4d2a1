"""FL-TAC's ClientApp handler on a real (tiny) model and real data: the client-side source check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.fltac import train
from client_app.fltac_training import Encoded, evaluate_adapter, example_losses
from fedspecialists.config import AdapterRunConfig, load_config_as
from fedspecialists.models.lora import build_preprocessor, get_adapter_model, initial_adapter
from fedspecialists.protocol.fltac import Instruction, TrainReply
from fedspecialists.protocol.records import record_to_numpy, state_to_record
from strategies.fltac import head_label_counts, select_feature_keys

OVERRIDES = "model=minilm suite=tiny_text train.num_threads=1"


def _context() -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1},  # one client: every task
        state=RecordDict(),
        run_config={"overrides": OVERRIDES},
    )


def _message(
    server_round: int,
    adapters: dict[str, dict[str, np.ndarray]],
    sources: list[str] | None = None,
    check: float = 0.0,
    fingerprints: bool = False,
) -> Message:
    """The server's training instruction: slots start from ``sources`` (default: all v0)."""
    instruction = Instruction(
        server_round=server_round,
        send_fingerprint=fingerprints,
        send_label_fingerprint=fingerprints,
        check_sources=check,
        slot_sources=sources,
        globals={gid: state_to_record(state) for gid, state in adapters.items()},
    )
    return Message(content=instruction.to_record(), dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.fixture(scope="module")
def task_globals() -> dict[str, dict[str, np.ndarray]]:
    """One adapter per tiny_text task, each trained by the real handler on that task alone."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as conftest does
    cfg = load_config_as(AdapterRunConfig, OVERRIDES)
    v0 = {k: v.numpy() for k, v in initial_adapter(cfg, 5).items()}
    reply = train(_message(1, {"v0": v0}), _context())
    return {
        f"g{i}": record_to_numpy(reply.content.array_records[f"adapter.slot{i}"]) for i in range(3)
    }


def test_real_heads_move_exactly_as_many_rows_as_their_task_has_labels(
    task_globals: dict[str, dict[str, np.ndarray]],
) -> None:
    # tiny_text: bbc_topic (5 labels), tweet_sentiment (3), movie_sentiment (2), all from v0.
    cfg = load_config_as(AdapterRunConfig, OVERRIDES)
    v0 = {k: v.numpy() for k, v in initial_adapter(cfg, 5).items()}
    heads = select_feature_keys(list(v0), "head", cfg.model.head_module)
    adapters = [task_globals[f"g{i}"] for i in range(3)]
    assert head_label_counts(adapters, [v0] * 3, heads).tolist() == [5, 3, 2]


def test_the_client_undoes_a_swapped_pair_and_says_so(
    task_globals: dict[str, dict[str, np.ndarray]],
) -> None:
    # The server starts slot 0 (bbc_topic) from slot 1's global and slot 1 from slot 0's.
    msg = _message(2, task_globals, sources=["g1", "g0", "g2"], check=4.6)
    reply = TrainReply.from_record(train(msg, _context()).content)
    assert reply.slot_sources == ["g0", "g1", "g2"]
    assert reply.source_swaps == 2
    assert reply.source_check_llr is not None and reply.source_check_llr >= 4.6


def test_the_client_keeps_a_right_plan_and_sends_nothing_when_off(
    task_globals: dict[str, dict[str, np.ndarray]],
) -> None:
    right = ["g0", "g1", "g2"]
    kept = train(_message(2, task_globals, sources=right, check=4.6), _context())
    assert TrainReply.from_record(kept.content).slot_sources == right
    assert kept.content.metric_records["metrics"]["source-swaps"] == 0
    swapped = ["g1", "g0", "g2"]
    off = train(_message(2, task_globals, sources=swapped, check=0.0), _context())
    assert TrainReply.from_record(off.content).slot_sources is None
    assert "source-swaps" not in off.content.metric_records["metrics"]


def test_the_client_sends_each_slots_fingerprints_only_when_asked(
    task_globals: dict[str, dict[str, np.ndarray]],
) -> None:
    right = ["g0", "g1", "g2"]
    reply = TrainReply.from_record(
        train(_message(2, task_globals, sources=right, fingerprints=True), _context()).content
    )
    assert reply.fingerprints is not None and reply.label_fingerprints is not None
    inputs = record_to_numpy(reply.fingerprints)
    labels = record_to_numpy(reply.label_fingerprints)
    width = inputs["slot0"].shape[0]
    # One row per label of the slot's task (5, 3, 2), each class's deviation from the mean of
    # the class means: the rows of the classes present sum to 0.
    assert [labels[f"slot{i}"].shape for i in range(3)] == [(5, width), (3, width), (2, width)]
    for i in range(3):
        present = np.abs(labels[f"slot{i}"]).sum(1) > 0
        assert present.sum() >= 2
        assert np.allclose(labels[f"slot{i}"][present].sum(0), 0.0, atol=1e-5)
    quiet = TrainReply.from_record(
        train(_message(2, task_globals, sources=right), _context()).content
    )
    assert quiet.fingerprints is None and quiet.label_fingerprints is None


def test_example_losses_are_each_examples_masked_cross_entropy() -> None:
    cfg = load_config_as(AdapterRunConfig, OVERRIDES)
    model = get_adapter_model(cfg, num_labels=3)
    model.load(
        "slot0", {k: v + 0.3 * torch.randn_like(v) for k, v in initial_adapter(cfg, 3).items()}
    )
    tok = build_preprocessor(cfg.model, "text_classification")
    texts = ["a short sentence", "another, longer text here", "third"]
    ids = tok(texts)
    enc = Encoded(
        inputs=[{k: ids[k][i] for k in ids} for i in range(3)],
        labels=torch.tensor([0, 1, 1]),
        num_labels=torch.tensor([2, 3, 2]),  # example 0 and 2 see two logits, example 1 three
        tasks=["t"] * 3,
        kind="text_classification",
        pad_token_id=int(tok.pad_token_id or 0),
    )
    losses = example_losses(model, "slot0", enc, batch_size=2)
    # By hand: each text alone through the model, softmax over its own labels only.
    expected = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            logits = model.model(**tok([text], return_tensors="pt")).logits[0]
            log_p = torch.log_softmax(logits[: int(enc.num_labels[i])], -1)
            expected.append(-float(log_p[int(enc.labels[i])]))
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-5)
    _, _, summed = evaluate_adapter(model, "slot0", enc, batch_size=3)
    assert summed == pytest.approx(float(np.sum(expected)), rel=1e-4)


def test_a_task_with_no_test_example_here_encodes_empty_and_scores_nothing() -> None:
    """At 1,000 clients a client often holds a task's training examples and none of its test
    examples; tokenizers refuse an empty batch, so the whole message failed (38 of 50)."""
    import datasets

    from client_app.fltac_training import encode
    from fedspecialists.data.tasks import ClientTask

    cfg = load_config_as(AdapterRunConfig, OVERRIDES)
    rows = datasets.Dataset.from_dict({"text": ["a fine film", "dull"], "label": [1, 0]})
    task = ClientTask(0, "t", "text_classification", 2, train=rows, test=rows.select([]))
    prep = build_preprocessor(cfg.model, "text_classification")
    empty = encode(task, "test", prep, cfg.model.max_length)
    assert len(empty) == 0 and empty.labels.shape == (0,) and empty.num_labels.shape == (0,)
    assert len(encode(task, "train", prep, cfg.model.max_length)) == 2
    adapters = get_adapter_model(cfg, 2)
    adapters.load("slot0", initial_adapter(cfg, 2))
    assert evaluate_adapter(adapters, "slot0", empty, 8) == (0, 0, 0.0)
