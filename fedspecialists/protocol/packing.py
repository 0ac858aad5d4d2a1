"""Each ArrayRecord of a message as one safetensors buffer (``federation.pack_arrays``).

Flower 1.42 sends a message as a tree of objects, one request per object, and every array of an
``ArrayRecord`` is two objects (the array and its chunk). An FL-TAC adapter is a dozen arrays,
so a round's instructions were hundreds of small objects, each pushed and pulled on its own;
packed, a record is one array of bytes in the safetensors format (names, dtypes, shapes in its
header, the record's key order in its metadata), read back without pickle.

Packing is a transport matter only: the server packs what it sends and unpacks what it
receives at the ledger (``strategies.common``), the ClientApp's ``packing_mod`` does the same
on its side, and every method's code sees the records as they were built. A record of fewer
than two arrays gains nothing and travels as it is; unpacking leaves unpacked records alone,
so a peer that does not pack is still understood.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedspecialists.protocol.values import ProtocolError

PACKED_STYPE = "safetensors"  # the packed array's serialisation type (Flower's `stype`)
PACKED_KEY = "safetensors"  # the packed record's only key
_ORDER = "keys"  # safetensors metadata entry: the record's keys in their order (JSON)


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one array of safetensors bytes (a record of < 2 arrays: unchanged)."""
    if len(record) < 2 or is_packed(record):
        return record
    # np.asarray(order="C"), not np.ascontiguousarray: that one turns a 0-d array into (1,)
    tensors = {key: np.asarray(record[key].numpy(), order="C") for key in record}
    data = save(tensors, metadata={_ORDER: json.dumps(list(tensors))})
    packed = Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)
    return ArrayRecord({PACKED_KEY: packed})


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is :func:`pack_record`'s output."""
    return len(record) == 1 and PACKED_KEY in record and record[PACKED_KEY].stype == PACKED_STYPE


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The arrays :func:`pack_record` packed, in their order; an unpacked record as it is.

    Raises :class:`ProtocolError` for bytes that are not a safetensors buffer or whose
    metadata does not name its tensors.
    """
    if not is_packed(record):
        return record
    data = bytes(record[PACKED_KEY].data)  # one copy of the buffer, read twice below
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ProtocolError(f"packed arrays unreadable: {exc}") from exc
    order = _key_order(data)
    if sorted(order) != sorted(tensors):
        raise ProtocolError("packed arrays: the key order does not name the tensors")
    return ArrayRecord({key: Array(tensors[key]) for key in order})


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord packed (the other records are the same objects)."""
    out = RecordDict()
    for name, record in content.items():
        out[name] = pack_record(record) if isinstance(record, ArrayRecord) else record
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """``content`` with every packed ArrayRecord unpacked; :class:`ProtocolError` names the
    record that cannot be."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            try:
                record = unpack_record(record)
            except ProtocolError as exc:
                raise ProtocolError(f"record '{name}': {exc}") from exc
        out[name] = record
    return out


def _key_order(data: bytes) -> list[str]:
    """The key order in a safetensors buffer's metadata (its JSON header's ``__metadata__``)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    try:
        order = json.loads(header["__metadata__"][_ORDER])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ProtocolError("packed arrays: no key order in the metadata") from exc
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        raise ProtocolError("packed arrays: the key order is not a list of names")
    return order
