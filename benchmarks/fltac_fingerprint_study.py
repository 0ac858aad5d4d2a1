"""How well FL-TAC's fingerprints alone find the tasks in round 1, over many partitions.

No training and no Flower runtime: for every client and task of a suite's partition (the
project's own data, partition and frozen model) this computes the two fingerprints a client
sends, the input fingerprint (mean representation) and the label fingerprint (per class, the
class's mean representation minus the mean of the class means), then groups them the way the
server does (constrained K-means within each label count, K = the tasks of that count) and
scores the grouping against the true tasks (adjusted Rand index), each feature with K-means as
the server runs it by default and weighted by each adapter's example count
(``fltac.kmeans_weighting=samples``). For each unweighted grouping it also records K-means'
objective (the rows' summed squared distance to their group's mean) for the grouping found and
for the true tasks: a miss where the true tasks scatter less is the search's, one where they
scatter more is the features' (no grouping that minimises the objective recovers the tasks
there). With ``--min-examples`` it also asks whether holding back the adapters trained on few
examples would let the rest be grouped right: the input fingerprints of the adapters with at
least m examples, grouped alone (``held_back_table``). Cheap enough for many seeds,
so it shows how a feature does on partitions no run was ever tuned on. The adapters' own head
block, which a real round adds, is left out: this measures what the fingerprints carry.

Usage::

    python benchmarks/fltac_fingerprint_study.py --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --out docs/results/fltac_fingerprint_study
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client_app.fltac_training import encode, input_representations, label_fingerprint
from fedspecialists.config import AdapterRunConfig, load_config_as
from fedspecialists.data.tasks import load_suite, partition_suite
from fedspecialists.models.lora import build_preprocessor, get_adapter_model, suite_kind
from strategies.fltac import (
    clustering_agreement,
    constrained_kmeans_labels,
    fingerprint_features,
    grouping_scatter,
    label_fingerprint_features,
)

SUITES = ("offline_text", "stress_binary", "stress_three_way", "stress_eight")
BLOCKS = ("input fingerprint", "label fingerprint", "input + label fingerprints")
WEIGHTED = " (K-means weighted by example count)"  # fltac.kmeans_weighting=samples
VARIANTS = (*BLOCKS, *(name + WEIGHTED for name in BLOCKS))
SCATTER = ": K-means objective, grouping found and true tasks"


def fingerprints(suite: str, seed: int) -> dict[str, Any]:
    """Every (client, task) of the partition: owner, true task, label count, both fingerprints."""
    cfg = load_config_as(AdapterRunConfig, [f"suite={suite}", f"seed={seed}"])
    tasks = load_suite(cfg.suite.tasks, seed, cfg.data.cache_dir)
    parts = partition_suite(
        tasks, cfg.federation.num_clients, cfg.partition.alpha, cfg.partition.min_share, seed
    )
    pre = build_preprocessor(cfg.model, suite_kind(cfg))
    model = get_adapter_model(cfg, max(t.num_labels for t in tasks))
    rows: dict[str, list[Any]] = {
        "owner": [],
        "task": [],
        "count": [],
        "examples": [],
        "input": [],
        "label": [],
    }
    for client, mine in enumerate(parts):
        for task in mine:
            enc = encode(task, "train", pre, cfg.model.max_length)
            reps = input_representations(model, enc, 64, cfg.model.head_module)
            rows["owner"].append(client)
            rows["task"].append(task.name)
            rows["count"].append(task.num_labels)
            rows["examples"].append(len(enc.labels))
            rows["input"].append(reps.mean(0))
            rows["label"].append(label_fingerprint(reps, enc.labels.numpy(), task.num_labels))
    return rows


def split_kmeans(
    features: np.ndarray,
    owners: list[int],
    counts: list[int],
    tasks: list[str],
    seed: int,
    weights: np.ndarray | None = None,
) -> list[int]:
    """Constrained K-means within each label count (K = that count's true number of tasks),
    as the server's label-count split runs it, rows weighted by ``weights`` ``(M,)`` where
    given; labels ``(M,)``."""
    counts_arr, owners_arr = np.asarray(counts), np.asarray(owners)
    labels, offset = np.zeros(len(counts), dtype=np.int64), 0
    for count in sorted(set(counts)):
        idx = np.flatnonzero(counts_arr == count)
        k = len({tasks[i] for i in idx})
        part = None if weights is None else weights[idx]
        labels[idx] = constrained_kmeans_labels(
            features[idx], owners_arr[idx].tolist(), k, seed, weights=part
        )
        labels[idx] += offset
        offset += k
    return labels.tolist()


def held_back(rows: dict[str, list[Any]], seed: int, min_examples: int) -> dict[str, Any]:
    """Round 1 on the input fingerprints of the adapters with at least ``min_examples``
    training examples only: their ARI, and how many adapters were held back."""
    keep = [i for i, n in enumerate(rows["examples"]) if n >= min_examples]
    pick = {key: [rows[key][i] for i in keep] for key in ("owner", "count", "task")}
    x = fingerprint_features(np.stack([rows["input"][i] for i in keep]))
    grouping = split_kmeans(x, pick["owner"], pick["count"], pick["task"], seed + 1)
    return {
        "ari": clustering_agreement(pick["task"], grouping),
        "held_back": len(rows["task"]) - len(keep),
    }


def study(suite: str, seed: int, min_examples: tuple[int, ...] = ()) -> dict[str, Any]:
    rows = fingerprints(suite, seed)
    inputs = fingerprint_features(np.stack(rows["input"]))
    labels = label_fingerprint_features(rows["label"])
    blocks = dict(zip(BLOCKS, (inputs, labels, np.hstack([inputs, labels])), strict=True))
    examples = np.asarray(rows["examples"], dtype=np.float64)
    one_class = sum(not np.any(f) for f in rows["label"])
    result: dict[str, Any] = {"suite": suite, "seed": seed, "adapters": len(rows["task"])}
    result["one_class_adapters"] = int(one_class)
    for name, x in blocks.items():  # round 1 of a run clusters with seed + 1
        for suffix, weights in (("", None), (WEIGHTED, examples)):
            grouping = split_kmeans(
                x, rows["owner"], rows["count"], rows["task"], seed + 1, weights
            )
            result[name + suffix] = clustering_agreement(rows["task"], grouping)
            if weights is None:
                result[name + SCATTER] = {
                    "found": grouping_scatter(x, grouping),
                    "tasks": grouping_scatter(x, rows["task"]),
                }
    for m in min_examples:
        result[f"input fingerprint, adapters with >= {m} examples"] = held_back(rows, seed, m)
    return result


def run_studies(
    one: Callable[[str, int], dict[str, Any]], suites: list[str], seeds: list[int], out: Path
) -> list[dict[str, Any]]:
    """``one(suite, seed)`` for every pair, each result printed as it comes, all in
    ``out/results.json``."""
    results = []
    for suite in suites:
        for seed in seeds:
            results.append(one(suite, seed))
            print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def suite_table(
    results: list[dict[str, Any]],
    columns: Sequence[Any],
    header: Callable[[Any], str],
    cell: Callable[[list[dict[str, Any]], Any], str],
) -> str:
    """A markdown table: one row per suite (in the order run), one cell per column, each
    ``cell(that suite's results, column)`` under ``header(column)``."""
    lines = [
        "| suite | " + " | ".join(header(c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for suite in dict.fromkeys(r["suite"] for r in results):
        mine = [r for r in results if r["suite"] == suite]
        lines.append(f"| {suite} | " + " | ".join(cell(mine, c) for c in columns) + " |")
    return "\n".join(lines)


def _ari_cell(mine: list[dict[str, Any]], variant: str) -> str:
    values = [r[variant] for r in mine]
    hits = sum(abs(x - 1.0) < 1e-9 for x in values)
    return " ".join(f"{x:.2f}" for x in values) + f" ({hits}/{len(values)})"


def table(results: list[dict[str, Any]]) -> str:
    return suite_table(results, VARIANTS, lambda v: f"{v}: ARI per seed (seeds at 1.0)", _ari_cell)


def miss_kind(ari: float, scatter: dict[str, float]) -> str:
    """``found`` (ARI 1), ``search`` (a miss whose true tasks scatter less than the grouping
    K-means found) or ``features`` (a miss whose true tasks scatter at least as much)."""
    if abs(ari - 1.0) < 1e-9:
        return "found"
    return "search" if scatter["tasks"] < scatter["found"] - 1e-9 else "features"


def _miss_cell(mine: list[dict[str, Any]], block: str) -> str:
    kinds = [miss_kind(r[block], r[block + SCATTER]) for r in mine]
    return " / ".join(str(kinds.count(k)) for k in ("found", "search", "features"))


def miss_table(results: list[dict[str, Any]]) -> str:
    """Per suite and unweighted block: partitions found, search misses, feature misses."""
    return suite_table(
        results, BLOCKS, lambda b: f"{b}: found / search miss / features miss", _miss_cell
    )


def held_back_table(results: list[dict[str, Any]], min_examples: list[int]) -> str:
    """Per suite and threshold m: partitions at ARI 1.0 when only adapters with >= m examples
    are grouped (input fingerprint), the lowest ARI, and the share of adapters held back."""

    def cell(mine: list[dict[str, Any]], m: int) -> str:
        runs = [r[f"input fingerprint, adapters with >= {m} examples"] for r in mine]
        aris = [x["ari"] for x in runs]
        hits = sum(abs(a - 1.0) < 1e-9 for a in aris)
        held = sum(x["held_back"] for x in runs) / sum(r["adapters"] for r in mine)
        return f"{hits}/{len(aris)}, {min(aris):.2f}, {held:.0%}"

    return suite_table(results, min_examples, lambda m: f"m = {m}: at 1.0, lowest, held back", cell)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=list(SUITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--out", type=Path, default=Path("runs/fltac_fingerprint_study"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--min-examples",
        type=int,
        nargs="*",
        default=[],
        help="also group only the adapters with at least m examples, for each m given",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    thresholds = tuple(args.min_examples)
    results = run_studies(
        lambda suite, seed: study(suite, seed, thresholds), args.suites, args.seeds, args.out
    )
    text = table(results) + "\n\n" + miss_table(results)
    if thresholds:
        text += "\n\n" + held_back_table(results, list(thresholds))
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
