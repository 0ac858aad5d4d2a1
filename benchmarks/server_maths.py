"""The server's maths at scale: FL-TAC's clustering and FedMoE-DA's A over M uploads.

FL-TAC: synthetic uploads shaped like the default model's (MiniLM-L6 adapters, head features,
input fingerprints): 4 tasks with 5, 3, 2 and 2 labels, every client holding all four, each
adapter v0 plus a rank-1 update of its task's head rows (a task direction plus noise), each
fingerprint its task's centre plus noise. The strategy's own features and clustering are timed
in every mode, next to the per-owner Hungarian assignment it replaced ("before"), with the
clustering agreement (ARI) against the true tasks. FedMoE-DA: M random gate proxies of the
default width; Eq. 8 (R), Eq. 9 (mask) and Eq. 10 (softmax) as the dense reference functions
compute them, and the sparse blockwise A the strategy uses, with siblings barred (``owners``)
and as the default computes it (``fedmoe_da.same_index``: each index k's experts alone, K = 4
of the default model). Peak memory is the process's
(``ru_maxrss``) after each size.

Usage::

    python benchmarks/server_maths.py --sizes 40 400 4000 40000 --out runs/server_maths
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score

import strategies.fltac as fltac
from strategies.fedmoe_da import (
    aggregation_matrix,
    correlation_matrix,
    sparse_aggregation_matrix,
    top_p_mask,
)
from strategies.fltac import PoolEntry, TaskAdapterClustering

LABELS = (5, 3, 2, 2)  # the default suite's label counts
MODES: dict[str, dict[str, Any]] = {  # name -> settings over the defaults (the default first)
    "default (constrained, split, fingerprints)": {},
    "constrained, no split, adapters only": {
        "split_by_label_count": False,
        "input_fingerprint": False,
        "label_fingerprint": False,
    },
    "paper (plain K-means, adapters only)": {
        "clustering": "kmeans",
        "split_by_label_count": False,
        "input_fingerprint": False,
        "label_fingerprint": False,
    },
    "auto K, constrained": {"num_clusters": "auto"},
    "auto K, plain K-means (silhouette)": {
        "num_clusters": "auto",
        "clustering": "kmeans",
        "split_by_label_count": False,
        "input_fingerprint": False,
        "label_fingerprint": False,
    },
}
NO_PROJECTION = {"projection_dim": 0}  # each mode again without it, where it applies


def before_assignment(
    features: np.ndarray,
    centroids: np.ndarray,
    groups: list[np.ndarray],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The assignment step before issue 14: an ``(M, k, D)`` cost, one Hungarian per owner
    (unweighted, as every mode timed here; ``weights`` is taken for the caller's signature)."""
    cost = ((features[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return fltac.hungarian_assignment(cost, groups)


def defaults() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The default model's round-0 adapter v0, head tensors only (what head features read),
    and the strategy's settings from the default config."""
    from fedspecialists.config import AdapterRunConfig, load_config_as
    from fedspecialists.models.lora import initial_adapter

    cfg = load_config_as(AdapterRunConfig, "")
    v0 = {k: v.numpy() for k, v in initial_adapter(cfg, max(LABELS)).items()}
    head = {k: v for k, v in v0.items() if "classifier." in k and "lora" not in k}
    return head, TaskAdapterClustering.config_kwargs(cfg)


def synthetic_pool(template: dict[str, np.ndarray], m: int, seed: int) -> list[PoolEntry]:
    """``m`` uploads (``m / 4`` clients x 4 tasks) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    weight_key = next(k for k in template if k.endswith("weight"))
    width = template[weight_key].shape[1]
    directions = rng.normal(size=(len(LABELS), width))
    centres = rng.normal(size=(len(LABELS), width))
    pool = []
    for i in range(m):
        client, task = divmod(i, len(LABELS))
        arrays = {k: v.copy() for k, v in template.items()}
        rows = LABELS[task]
        signs = rng.normal(size=(rows, 1))
        update = signs * (directions[task] + 0.5 * rng.normal(size=width))[None, :]
        arrays[weight_key][:rows] += 1e-2 * update.astype(np.float32)
        for key in template:
            if key.endswith("bias"):
                arrays[key][:rows] += 1e-2 * rng.normal(size=rows).astype(np.float32)
        fingerprint = centres[task] + 0.5 * rng.normal(size=width)
        label_fingerprint = directions[task] * signs + 0.5 * rng.normal(size=(rows, width))
        pool.append(
            PoolEntry(client, task, arrays, 10, "v0", f"task{task}", fingerprint, label_fingerprint)
        )
    return pool


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def fltac_rows(
    template: dict[str, np.ndarray], settings: dict[str, Any], m: int, before_up_to: int
) -> list[dict[str, Any]]:
    pool = synthetic_pool(template, m, seed=m)
    rows = []
    for mode, changes in MODES.items():
        variants = [("", {**settings, **changes})]
        if m > settings["projection_min_adapters"]:
            variants.append((", no projection", {**settings, **changes, **NO_PROJECTION}))
        for suffix, kwargs in variants:
            row = {"mode": mode + suffix, "M": m, **fltac_mode(template, pool, kwargs)}
            if m <= before_up_to and "cluster_before_s" not in row:
                row.update(before(template, pool, kwargs))
            rows.append(_public(row))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fltac_mode(
    template: dict[str, np.ndarray], pool: list[PoolEntry], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """One mode's features and clustering on ``pool``: times, width seen, ARI."""
    strategy = TaskAdapterClustering(template, **kwargs)
    strategy.open_round(1)
    features, t_features = timed(lambda: strategy.clustering_features(pool))
    labels, t_cluster = timed(lambda: strategy.cluster(pool, features, seed=1))
    return {
        "D": int(features.shape[1]),
        "features_s": t_features,
        "cluster_s": t_cluster,
        "ari": float(adjusted_rand_score([e.true_task for e in pool], labels)),
        "labels": labels,
    }


def before(
    template: dict[str, np.ndarray], pool: list[PoolEntry], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The constrained modes' clustering with the assignment step they had before."""
    if kwargs.get("clustering") != "constrained_kmeans":
        return {}
    fast = fltac.constrained_assignment
    fltac.constrained_assignment = before_assignment  # type: ignore[assignment]
    try:
        old = fltac_mode(template, pool, kwargs)
    finally:
        fltac.constrained_assignment = fast  # type: ignore[assignment]
    return {"cluster_before_s": old["cluster_s"], "before_labels": old["labels"]}


def fedmoe_rows(m: int, width: int, p: int, dense_up_to: int) -> dict[str, Any]:
    rng = np.random.default_rng(m)
    proxies = rng.normal(size=(m, width))
    owners = np.repeat(np.arange(m // 4 + 1), 4)[:m].tolist()
    row: dict[str, Any] = {"M": m, "d": width}
    if m <= dense_up_to:
        r, row["correlation_s"] = timed(lambda: correlation_matrix(proxies))
        _, row["mask_s"] = timed(lambda: top_p_mask(r, p, owners))
        _, row["softmax_s"] = timed(lambda: aggregation_matrix(r, p, 1.0, owners))
        del r
    a, row["sparse_a_s"] = timed(lambda: sparse_aggregation_matrix(proxies, p, 1.0, 0.0, owners))
    row["kept_entries"] = int(a.nnz)
    # The default (fedmoe_da.same_index, siblings allowed): each index k's experts alone.
    positions = (np.arange(m) % 4).tolist()
    _, row["sparse_a_same_index_s"] = timed(
        lambda: sparse_aggregation_matrix(proxies, p, 1.0, 0.0, positions=positions)
    )
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 400, 4000])
    parser.add_argument("--out", type=Path, default=Path("runs/server_maths"))
    parser.add_argument("--before-up-to", type=int, default=4000, help="time the old step to M")
    parser.add_argument("--dense-up-to", type=int, default=4000, help="dense Eq. 8-10 up to M")
    parser.add_argument("--proxy-width", type=int, default=512, help="the default gate's width")
    parser.add_argument("--peers", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    template, settings = defaults()
    results: dict[str, Any] = {"fltac": [], "fedmoe_da": [], "peak_rss_mb": {}}
    for m in args.sizes:
        results["fltac"] += [
            _public(r) for r in fltac_rows(template, settings, m, args.before_up_to)
        ]
        results["fedmoe_da"].append(fedmoe_rows(m, args.proxy_width, args.peers, args.dense_up_to))
        results["peak_rss_mb"][str(m)] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.out / "server_maths.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its label arrays; whether the old step gave the same labels."""
    out = {k: v for k, v in row.items() if k not in ("labels", "before_labels")}
    if "before_labels" in row:
        out["same_labels_as_before"] = bool(np.array_equal(row["labels"], row["before_labels"]))
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| FL-TAC mode | M | D | features (s) | clustering (s) | before (s) | ARI |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["fltac"]:
        before = f"{r['cluster_before_s']:.2f}" if "cluster_before_s" in r else "n/a"
        lines.append(
            f"| {r['mode']} | {r['M']} | {r['D']} | {r['features_s']:.2f} | "
            f"{r['cluster_s']:.2f} | {before} | {r['ari']:.3f} |"
        )
    lines += [
        "",
        "| FedMoE-DA, M experts | R, Eq. 8 (s) | mask, Eq. 9 (s) | softmax, Eq. 10 (s) "
        "| sparse A, all three (s) | kept entries | sparse A, same index (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["fedmoe_da"]:
        dense = [
            f"{r[k]:.2f}" if k in r else "n/a" for k in ("correlation_s", "mask_s", "softmax_s")
        ]
        lines.append(
            f"| {r['M']} | {' | '.join(dense)} | {r['sparse_a_s']:.2f} | {r['kept_entries']} "
            f"| {r.get('sparse_a_same_index_s', float('nan')):.2f} "
            f"| {results['peak_rss_mb'][str(r['M'])]:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
