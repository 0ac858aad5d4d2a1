"""``federation.pack_arrays``: records packed to one safetensors array, and back, on both sides."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client_app.packing import packing_mod
from fedspecialists.protocol.fltac import TrainReply
from fedspecialists.protocol.packing import (
    PACKED_KEY,
    is_packed,
    pack_content,
    pack_record,
    unpack_content,
    unpack_record,
)
from fedspecialists.protocol.values import ProtocolError
from strategies.baselines import NO_TASK_EVIDENCE
from strategies.fltac import TaskAdapterClustering

A = "base_model.model.layer.lora_A.weight"
W = "base_model.model.classifier.weight"
V0 = {A: np.zeros((1, 2), np.float32), W: np.zeros((2, 2), np.float32)}


def _record() -> ArrayRecord:
    """Keys out of alphabetical order and three dtypes: what packing must keep."""
    return ArrayRecord(
        {
            "z.weight": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "a.bias": Array(np.array([1.5, -2.0], dtype=np.float64)),
            "m.count": Array(np.array([[7]], dtype=np.int64)),
        }
    )


def test_a_packed_record_is_one_array_and_unpacks_to_the_same_arrays_in_order() -> None:
    record = _record()
    packed = pack_record(record)
    assert list(packed) == [PACKED_KEY] and is_packed(packed)
    back = unpack_record(packed)
    assert list(back) == ["z.weight", "a.bias", "m.count"]
    for key in record:
        original, restored = record[key].numpy(), back[key].numpy()
        assert restored.dtype == original.dtype and restored.shape == original.shape
        np.testing.assert_array_equal(restored, original)


def test_the_packed_bytes_are_a_safetensors_buffer_with_the_key_order() -> None:
    data = bytes(pack_record(_record())[PACKED_KEY].data)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    assert header["z.weight"]["dtype"] == "F32" and header["z.weight"]["shape"] == [2, 3]
    assert header["a.bias"]["dtype"] == "F64" and header["m.count"]["dtype"] == "I64"
    assert json.loads(header["__metadata__"]["keys"]) == ["z.weight", "a.bias", "m.count"]
    # 6 float32 + 2 float64 + 1 int64: 24 + 16 + 8 bytes of tensor data after the header.
    assert len(data) == 8 + size + 48


def test_scalars_empty_and_boolean_arrays_keep_their_shapes_and_dtypes() -> None:
    record = ArrayRecord(
        {
            "scalar": Array(np.array(3.0, dtype=np.float32)),
            "empty": Array(np.zeros((0, 3), np.float32)),
            "mask": Array(np.array([True, False])),
            "half": Array(np.ones((2, 2), np.float16)),
        }
    )
    back = unpack_record(pack_record(record))
    for key in record:
        assert back[key].numpy().shape == record[key].numpy().shape
        assert back[key].numpy().dtype == record[key].numpy().dtype
    assert back["scalar"].numpy() == np.float32(3.0)


def test_small_and_unpacked_records_pass_unchanged() -> None:
    one = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    assert pack_record(one) is one  # a single array gains nothing
    assert unpack_record(one) is one  # a peer that does not pack is still understood
    empty = ArrayRecord()
    assert pack_record(empty) is empty


def test_pack_content_packs_array_records_only() -> None:
    config = ConfigRecord({"server-round": 2})
    content = RecordDict({"adapter.v0": _record(), "config": config})
    packed = pack_content(content)
    assert is_packed(packed.array_records["adapter.v0"])
    assert packed.config_records["config"] is config
    assert list(unpack_content(packed).array_records["adapter.v0"]) == list(_record())


def test_packing_cuts_flower_objects_to_two_per_record() -> None:
    """The point of packing: Flower sends an array as two objects (array and chunk), each its
    own request; a 26-array adapter (MiniLM's) is 52 of them, packed 2."""
    adapter = ArrayRecord({f"t{i}": Array(np.full(4, i, np.float32)) for i in range(26)})
    plain = len(get_all_nested_objects(RecordDict({"adapter.v0": adapter})))
    packed = len(get_all_nested_objects(pack_content(RecordDict({"adapter.v0": adapter}))))
    assert plain == 1 + 1 + 26 * 2  # record dict, array record, 26 x (array, chunk)
    assert packed == 1 + 1 + 2


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"not a safetensors buffer", "unreadable"),
        (None, "no key order"),  # a valid buffer without our metadata
    ],
)
def test_malformed_packed_bytes_name_the_record(data: bytes | None, reason: str) -> None:
    if data is None:
        from safetensors.numpy import save

        data = save({"w": np.ones(2, np.float32)})
    bad = Array(dtype="uint8", shape=(len(data),), stype="safetensors", data=data)
    content = RecordDict({"adapter.slot0": ArrayRecord({PACKED_KEY: bad})})
    with pytest.raises(ProtocolError, match=f"record 'adapter.slot0'.*{reason}"):
        unpack_content(content)


def _fltac(pack: bool) -> TaskAdapterClustering:
    return TaskAdapterClustering(V0, **{**NO_TASK_EVIDENCE, "num_clusters": 1}, pack_arrays=pack)


def test_the_server_sends_packed_records_and_counts_the_packed_bytes() -> None:
    from fedspecialists.protocol.records import content_nbytes

    for pack in (True, False):
        strategy = _fltac(pack)
        sent = list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1])))  # type: ignore[arg-type]
        assert is_packed(sent[0].content.array_records["adapter.v0"]) is pack
        down = strategy.ledger.round_summary()["train_down"]
        assert down == content_nbytes(sent[0].content)


def test_a_reply_with_malformed_packed_arrays_is_rejected_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _fltac(True)
    grid = FakeGrid([1, 2])
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, None, ConfigRecord(), grid)  # type: ignore[arg-type]
    }
    good = TrainReply([ArrayRecord({k: Array(v + 0.1) for k, v in V0.items()})], [4]).to_record()
    bad = pack_content(
        TrainReply([ArrayRecord({k: Array(v) for k, v in V0.items()})], [4]).to_record()
    )
    junk = b"\x00" * 16
    bad.array_records["adapter.slot0"] = ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(16,), stype="safetensors", data=junk)}
    )
    replies = [Message(pack_content(good), reply_to=sent[1]), Message(bad, reply_to=sent[2])]
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, replies)
    assert strategy.record.replies_ok == 1 and strategy.record.replies_rejected == 1
    assert "adapter.slot0" in strategy.record.rejected_reasons[0]
    assert "packed arrays unreadable" in caplog.text
    np.testing.assert_allclose(strategy.final_adapters()["g0"][A], V0[A] + 0.1, rtol=1e-6)


def _context(pack: bool) -> Context:
    overrides = "" if pack else "federation.pack_arrays=false"
    return Context(1, 1, {}, RecordDict(), {"overrides": overrides})


def test_the_clientapp_mod_unpacks_what_comes_and_packs_what_goes() -> None:
    incoming = Message(pack_content(RecordDict({"adapter.v0": _record()})), 1, MessageType.TRAIN)
    seen: list[RecordDict] = []

    def handler(msg: Message, _context: Context) -> Message:
        seen.append(msg.content)
        return Message(RecordDict({"adapter.slot0": _record()}), reply_to=msg)

    for pack in (True, False):
        reply = packing_mod(incoming, _context(pack), handler)
        assert list(seen[-1].array_records["adapter.v0"]) == list(_record())  # unpacked
        assert is_packed(reply.content.array_records["adapter.slot0"]) is pack
