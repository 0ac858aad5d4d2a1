"""One node's FL-TAC examples, encoded once and cached on the site's disk.

In a deployment Flower starts a fresh ClientApp process for every message: without a cache
each one imports ``datasets``, loads the suite, partitions it and tokenises this node's share
again. The first message writes the node's encoded examples (every task, both splits) to
``<data.cache_dir>/encoded/<key>.safetensors``; later processes read that file and never import
the data-loading stack. The key covers everything the examples depend on: the suite's task specs
(with the size and time of their files), the partition settings, this node's partition, the
model's preprocessing settings, the seed, and a site's own data folder (every file's size and
time). ``data.cache_encoded=false`` turns it off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common.logger import log

from fedspecialists.config import AdapterRunConfig, as_task_spec

if TYPE_CHECKING:
    from client_app.fltac_training import Encoded

FORMAT = 1  # bump when the encoding or this file's layout changes: old files are not read


@dataclass
class TaskExamples:
    """One task of this node: its name, kind, label count and encoded splits."""

    name: str
    kind: str
    num_labels: int
    train: Encoded
    test: Encoded


@dataclass
class NodeExamples:
    """Every task this node holds, and the label count of each task of the suite (the shared
    head is as wide as the largest)."""

    tasks: list[TaskExamples]
    suite_label_counts: list[int]


def cache_key(cfg: AdapterRunConfig, partition: tuple[int, int], data_dir: str | None) -> str:
    """A digest of everything this node's encoded examples depend on."""
    from fedspecialists.data.domains import files_fingerprint

    specs = [as_task_spec(t) for t in cfg.suite.tasks]
    parts = [
        FORMAT,
        [dataclasses.asdict(s) for s in specs],
        [files_fingerprint(s) for s in specs],
        dataclasses.asdict(cfg.partition),
        dataclasses.asdict(cfg.model),
        cfg.seed,
        list(partition),
        _folder_fingerprint(data_dir) if data_dir else None,
    ]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _folder_fingerprint(folder: str) -> list[list[Any]]:
    """Every file under ``folder``: relative path, size and modification time."""
    root = Path(folder).expanduser()
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        out.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return out


# -- Encoded <-> arrays -----------------------------------------------------------------------
def _encoded_arrays(prefix: str, enc: Encoded) -> dict[str, np.ndarray]:
    """``enc`` as flat arrays: labels, and each input key stacked ``(N, ...)`` (equal shapes)
    or ragged (``.flat`` values and ``.lengths``)."""
    arrays = {f"{prefix}labels": enc.labels.numpy()}
    for key in enc.inputs[0] if enc.inputs else []:
        values = [row[key] for row in enc.inputs]
        if hasattr(values[0], "numpy"):  # tensors of one shape (pixel values)
            arrays[f"{prefix}input.{key}"] = np.stack([v.numpy() for v in values])
        else:  # token ids: one list per example, of any length
            arrays[f"{prefix}input.{key}.flat"] = np.asarray(
                [x for v in values for x in v], dtype=np.int64
            )
            arrays[f"{prefix}input.{key}.lengths"] = np.asarray([len(v) for v in values], np.int64)
    return arrays


def _encoded_from(
    prefix: str, arrays: dict[str, np.ndarray], task: dict[str, Any], pad: int
) -> Encoded:
    import torch

    from client_app.fltac_training import Encoded

    labels = torch.from_numpy(arrays[f"{prefix}labels"])
    n = len(labels)
    columns: dict[str, list[Any]] = {}
    head = f"{prefix}input."
    for name in arrays:
        if not name.startswith(head) or name.endswith(".lengths"):
            continue
        key = name[len(head) :]
        if key.endswith(".flat"):
            key = key[: -len(".flat")]
            ends = np.cumsum(arrays[f"{head}{key}.lengths"])
            flat = arrays[name].tolist()
            starts = np.concatenate([[0], ends[:-1]])
            columns[key] = [flat[s:e] for s, e in zip(starts, ends, strict=True)]
        else:
            columns[key] = list(torch.from_numpy(arrays[name]))
    inputs = [{key: values[i] for key, values in columns.items()} for i in range(n)]
    return Encoded(
        inputs=inputs,
        labels=labels,
        num_labels=torch.full((n,), task["num_labels"], dtype=torch.long),
        tasks=[task["name"]] * n,
        kind=task["kind"],
        pad_token_id=pad,
    )


def save_examples(path: Path, examples: NodeExamples) -> None:
    """Write ``examples`` to ``path`` atomically (a concurrent reader sees a whole file)."""
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    for i, task in enumerate(examples.tasks):
        for split in ("train", "test"):
            arrays.update(_encoded_arrays(f"{i}.{split}.", getattr(task, split)))
    pads = {t.name: t.train.pad_token_id for t in examples.tasks}
    meta = {
        "format": FORMAT,
        "tasks": [
            {"name": t.name, "kind": t.kind, "num_labels": t.num_labels} for t in examples.tasks
        ],
        "suite_label_counts": examples.suite_label_counts,
        "pad_token_id": pads,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        name = f.name
    try:
        save_file(arrays, name, metadata={"examples": json.dumps(meta)})
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)  # a full disk: leave no partial file
        raise


def load_examples(path: Path) -> NodeExamples | None:
    """What :func:`save_examples` wrote, or ``None`` if ``path`` is missing or unreadable
    (logged; the caller builds the examples again)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["examples"])
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        if meta["format"] != FORMAT:
            return None
        tasks = []
        for i, task in enumerate(meta["tasks"]):
            pad = int(meta["pad_token_id"][task["name"]])
            train, test = (_encoded_from(f"{i}.{s}.", arrays, task, pad) for s in ("train", "test"))
            tasks.append(TaskExamples(task["name"], task["kind"], task["num_labels"], train, test))
        return NodeExamples(tasks, [int(n) for n in meta["suite_label_counts"]])
    except Exception as exc:  # a damaged file costs a rebuild, never the message
        log(WARNING, "encoded examples %s unreadable (%s): encoding again", path, exc)
        return None


# -- building ---------------------------------------------------------------------------------
def build_examples(
    cfg: AdapterRunConfig,
    partition: tuple[int, int],
    data_dir: str | None,
    preprocessor: Callable[[], Any],
) -> NodeExamples:
    """Load the suite (or a site's own files), take this node's share and encode it with
    ``preprocessor()`` (the model's tokenizer or image processor)."""
    from client_app.fltac_training import encode
    from fedspecialists.data.tasks import (
        client_tasks,
        declared_num_labels,
        load_suite,
        site_tasks,
    )

    if data_dir:  # a site with its own files: all of them, nothing partitioned
        mine = site_tasks(cfg.suite.tasks, data_dir, cfg.seed, cfg.data.cache_dir)
        counts = declared_num_labels(cfg.suite.tasks) or [t.num_labels for t in mine]
    else:
        tasks = load_suite(cfg.suite.tasks, cfg.seed, cfg.data.cache_dir)
        mine = client_tasks(
            tasks, *partition, cfg.partition.alpha, cfg.partition.min_share, cfg.seed
        )
        counts = [t.num_labels for t in tasks]
    length, prep = cfg.model.max_length, preprocessor()
    encoded = [
        TaskExamples(
            t.name,
            t.kind,
            t.num_labels,
            encode(t, "train", prep, length),
            encode(t, "test", prep, length),
        )
        for t in mine
    ]
    return NodeExamples(encoded, counts)


def node_examples(
    cfg: AdapterRunConfig,
    partition: tuple[int, int],
    data_dir: str | None,
    preprocessor: Callable[[], Any],
) -> NodeExamples:
    """This node's encoded examples: from the site's disk cache, else built (and cached)."""
    if not cfg.data.cache_encoded:
        return build_examples(cfg, partition, data_dir, preprocessor)
    key = cache_key(cfg, partition, data_dir)
    path = Path(cfg.data.cache_dir).expanduser() / "encoded" / f"{key}.safetensors"
    cached = load_examples(path)
    if cached is not None:
        return cached
    examples = build_examples(cfg, partition, data_dir, preprocessor)
    save_examples(path, examples)
    return examples
