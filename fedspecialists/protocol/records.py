"""Adapters as Flower records, their serialized size, and the checks every reply passes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

if TYPE_CHECKING:  # imported where used: a ClientApp that only forwards never loads torch
    import torch

ADAPTER_PREFIX = "adapter."
# FL-TAC's input fingerprints: one ArrayRecord, one (H,) array per slot ("slot<i>").
FINGERPRINT_RECORD = "fingerprints"
# FL-TAC's label fingerprints: one ArrayRecord, one (C, H) array per slot ("slot<i>").
LABEL_FINGERPRINT_RECORD = "label_fingerprints"
# FL-TAC's source check: a ConfigRecord whose "slot-sources" names the global each slot used.
SOURCES_RECORD = "sources"
FAULT_RECORD = "fault"  # config "fault": kind -- a fault injected on purpose (metrics only)


def state_to_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """A tensor dict (e.g. a peft adapter state dict) as an ``ArrayRecord`` (keys kept)."""
    return ArrayRecord(
        # order="C", not np.ascontiguousarray, which turns a 0-d array into (1,)
        {key: Array(np.asarray(_to_numpy(value), order="C")) for key, value in state.items()}
    )


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of ``record`` as NumPy arrays, in the record's key order."""
    return {key: record[key].numpy() for key in record}


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The arrays of ``record`` as torch tensors (for ``set_peft_model_state_dict``)."""
    import torch

    return {
        key: torch.from_numpy(np.array(value)) for key, value in record_to_numpy(record).items()
    }


def content_nbytes(content: RecordDict) -> int:
    """Serialized size in bytes of a message's content, as Flower puts it on the wire."""
    return int(recorddict_to_proto(content).ByteSize())


def adapter_names(content: RecordDict) -> list[str]:
    """Names (without prefix) of the adapter ArrayRecords in ``content``, sorted."""
    return sorted(
        k[len(ADAPTER_PREFIX) :] for k in content.array_records if k.startswith(ADAPTER_PREFIX)
    )


def check_adapter(
    arrays: Mapping[str, np.ndarray],
    template: Mapping[str, np.ndarray],
    max_abs_value: float,
    reference: Mapping[str, np.ndarray] | None = None,
    max_update_norm: float | None = None,
) -> str | None:
    """Why ``arrays`` cannot enter aggregation, or ``None`` if it can.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        One uploaded adapter.
    template : Mapping[str, np.ndarray]
        The expected keys, shapes and dtypes (the server's initial adapter).
    max_abs_value : float
        Largest absolute value accepted in any tensor (a cheap guard against poisoned updates).
    reference, max_update_norm : optional
        When both are given, the L2 norm of ``arrays - reference`` (over all tensors) must not
        exceed ``max_update_norm``.
    """
    missing = sorted(set(template) - set(arrays))
    unexpected = sorted(set(arrays) - set(template))
    if missing:
        return f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}"
    if unexpected:
        return f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
    squared = 0.0
    for key, expected in template.items():
        value = arrays[key]
        if value.shape != expected.shape:
            return f"wrong shape for {key}: {value.shape} instead of {expected.shape}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"non-float dtype {value.dtype} for {key}"
        if not np.all(np.isfinite(value)):
            return f"non-finite values (NaN/Inf) in {key}"
        peak = float(np.max(np.abs(value))) if value.size else 0.0
        if peak > max_abs_value:
            return f"|value| {peak:.3g} above validation.max_abs_value={max_abs_value:g} in {key}"
        if reference is not None and max_update_norm is not None:
            squared += float(np.sum((value.astype(np.float64) - reference[key]) ** 2))
    if reference is not None and max_update_norm is not None:
        norm = float(np.sqrt(squared))
        if norm > max_update_norm:
            return f"update norm {norm:.3g} above validation.max_update_norm={max_update_norm:g}"
    return None


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (possibly on a GPU)
        return value.detach().cpu().numpy()
    return np.asarray(value)
