"""A run's checkpoint: what its strategy needs to go on after the last completed round.

Layout inside the run folder::

    checkpoint/checkpoint.json          round, the tensors file and its SHA-256, the JSON state
    checkpoint/round-<k>.safetensors    the strategy's arrays after round k

Writing is crash-safe: the tensors go to a new file first, then ``checkpoint.json`` is replaced
in one atomic step (the commit point), then older tensor files are removed. A crash at any
moment leaves the previous checkpoint or the new one, never a mix; :func:`load_checkpoint`
checks the tensors against the hash it committed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

from fedspecialists.run.status import atomic_write

FOLDER, INDEX = "checkpoint", "checkpoint.json"


class CheckpointError(RuntimeError):
    """A run folder that cannot be resumed; the message says why."""


@dataclass
class Checkpoint:
    """One completed round's state: ``arrays`` (name -> tensor) and a JSON-able ``state``."""

    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``run_dir/checkpoint/`` (see the module docstring)."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    tensors = f"round-{checkpoint.round}.safetensors"
    # order="C", not np.ascontiguousarray, which turns a 0-d array into (1,)
    data = save({k: np.asarray(v, order="C") for k, v in checkpoint.arrays.items()})
    atomic_write(folder / tensors, data)
    index = {
        "round": checkpoint.round,
        "tensors": tensors,
        "sha256": hashlib.sha256(data).hexdigest(),
        "state": checkpoint.state,
    }
    atomic_write(folder / INDEX, json.dumps(index).encode())
    for old in folder.glob("round-*.safetensors"):
        if old.name != tensors:
            old.unlink(missing_ok=True)
    return folder / INDEX


def checkpointed_round(run_dir: Path) -> int:
    """The last round ``run_dir`` committed a checkpoint of; 0 if none (cheap: the index only)."""
    index_path = Path(run_dir) / FOLDER / INDEX
    if not index_path.exists():
        return 0
    return int(json.loads(index_path.read_text())["round"])


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The last committed checkpoint of ``run_dir`` (:class:`CheckpointError` if none or bad)."""
    index_path = Path(run_dir) / FOLDER / INDEX
    if not index_path.exists():
        raise CheckpointError(f"{run_dir} has no checkpoint (no completed round to resume from)")
    try:
        index = json.loads(index_path.read_text())
        tensors = index_path.parent / str(index["tensors"])
        data = tensors.read_bytes()
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{index_path} is unreadable: {exc!r}") from exc
    if hashlib.sha256(data).hexdigest() != index.get("sha256"):
        raise CheckpointError(f"{tensors} does not match the hash its checkpoint committed")
    return Checkpoint(int(index["round"]), load_file(str(tensors)), dict(index["state"]))
