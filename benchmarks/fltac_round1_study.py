"""What tells FL-TAC's tasks apart after round 1: features, fingerprints, K, client-side choice.

Trains one round of real round-1 adapters in this process (the project's own data, partition,
model and training loop; no Flower runtime, since only the server's maths is studied), then
measures the clustering agreement (ARI against the true tasks) that constrained K-means reaches
on each candidate feature, what an automatic K picks, and what clients would choose if each
picked, by loss on its own data, among the round-1 cluster means (IFCA-style assignment).

Usage::

    python benchmarks/fltac_round1_study.py --suites stress_binary stress_three_way offline_text \
        --seeds 0 1 2 --out docs/results/fltac_round1_study
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import silhouette_score

from client_app.training import round_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fltac_fingerprint_study import run_studies, split_kmeans

from client_app.fltac_training import (
    collate,
    encode,
    input_representations,
    label_fingerprint,
    masked_logits,
    train_adapter,
)
from fedspecialists.config import AdapterRunConfig, load_config_as
from fedspecialists.data.tasks import load_suite, partition_suite
from fedspecialists.models.lora import (
    build_preprocessor,
    get_adapter_model,
    initial_adapter,
    suite_kind,
)
from strategies.fltac import (
    clustering_agreement,
    constrained_kmeans_labels,
    fingerprint_features,
    group_means,
    kmeans_labels,
    label_fingerprint_features,
    tasks_lower_bound,
)

FEATURES = ("head", "lora_A", "lora_B", "lora_BA", "all")


def _rows(adapters: list[dict[str, np.ndarray]], v0: dict[str, np.ndarray], which: str) -> Any:
    keys = sorted(v0)
    pick = {
        "head": [k for k in keys if "classifier" in k and "lora" not in k],
        "lora_A": [k for k in keys if "lora_A" in k],
        "lora_B": [k for k in keys if "lora_B" in k],
        "all": keys,
    }
    if which == "lora_BA":
        pairs = list(zip(pick["lora_A"], pick["lora_B"], strict=True))
        return np.stack(
            [np.concatenate([(a[b] @ a[aa]).ravel() for aa, b in pairs]) for a in adapters]
        )
    return np.stack(
        [np.concatenate([(a[k] - v0[k]).ravel() for k in pick[which]]) for a in adapters]
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _choice_by_loss(losses: np.ndarray, owners: list[int]) -> np.ndarray:
    """Each client's slots to distinct clusters, minimising summed loss (Hungarian)."""
    out = np.empty(len(owners), dtype=np.int64)
    for owner in set(owners):
        rows = np.flatnonzero(np.asarray(owners) == owner)
        r, c = linear_sum_assignment(losses[rows])
        out[rows[r]] = c
    return out


def _client_choice(
    model: Any,
    adapters: list[dict[str, np.ndarray]],
    head: np.ndarray,
    encs: list[tuple[Any, int]],
    owners: list[int],
    truth: list[str],
    k: int,
    seed: int,
) -> dict[str, float]:
    """IFCA-style: each client picks, by loss on its own data, among round-1 means of head-only
    clustering (what FL-TAC had before fingerprints)."""
    labels = constrained_kmeans_labels(head, owners, k, seed)
    means = group_means(adapters, labels.tolist())
    for c, mean in means.items():
        model.load(f"g{c}", {kk: torch.tensor(v) for kk, v in mean.items()})
    losses = np.zeros((len(adapters), k))
    with torch.no_grad():
        for j, (enc, c_j) in enumerate(encs):
            batch = collate(enc, list(range(len(enc))))
            for c in range(k):
                model.activate(f"g{c}")
                model.model.eval()
                logits = masked_logits(model.model(**batch).logits, enc.num_labels)[:, :c_j]
                losses[j, c] = float(F.cross_entropy(logits, enc.labels))
    return {
        "round-1 head clustering": clustering_agreement(truth, labels.tolist()),
        "clients' choice by loss": clustering_agreement(
            truth, _choice_by_loss(losses, owners).tolist()
        ),
    }


def study(suite: str, seed: int) -> dict[str, Any]:
    cfg = load_config_as(AdapterRunConfig, [f"suite={suite}", f"seed={seed}"])
    tasks = load_suite(cfg.suite.tasks, seed, cfg.data.cache_dir)
    width = max(t.num_labels for t in tasks)
    parts = partition_suite(
        tasks, cfg.federation.num_clients, cfg.partition.alpha, cfg.partition.min_share, seed
    )
    pre = build_preprocessor(cfg.model, suite_kind(cfg))
    model = get_adapter_model(cfg, width)
    v0_t = initial_adapter(cfg, width)
    v0 = {k: v.numpy() for k, v in v0_t.items()}
    adapters, fps, label_fps, owners, truth, encs = [], [], [], [], [], []
    for client, mine in enumerate(parts):
        for slot, task in enumerate(mine):
            enc = encode(task, "train", pre, cfg.model.max_length)
            model.load("slot0", {k: v.clone() for k, v in v0_t.items()})
            # The ClientApp's round-1 seed for this slot.
            train_adapter(model, "slot0", enc, cfg.train, round_seed(seed, 1, client, slot))
            adapters.append({k: v.numpy().copy() for k, v in model.state("slot0").items()})
            reps = input_representations(model, enc, 64, cfg.model.head_module)
            fps.append(reps.mean(0))
            label_fps.append(label_fingerprint(reps, enc.labels.numpy(), task.num_labels))
            owners.append(client)
            truth.append(task.name)
            encs.append((enc, task.num_labels))
    k = len(tasks)
    fp_block = fingerprint_features(np.stack(fps))
    result: dict[str, Any] = {"suite": suite, "seed": seed, "adapters": len(adapters), "ari": {}}
    for which in FEATURES:
        x = _rows(adapters, v0, which)
        for prep, z in (("unit", _unit(x)), ("centred+unit", _unit(x - x.mean(0)))):
            labels = constrained_kmeans_labels(z, owners, k, seed)
            result["ari"][f"{which} ({prep})"] = clustering_agreement(truth, labels.tolist())
    head = _unit(_rows(adapters, v0, "head"))
    for name, z in (
        ("fingerprint alone", fp_block),
        ("head + fingerprint (default)", np.hstack([head, fp_block])),
    ):
        result["ari"][name] = clustering_agreement(
            truth, constrained_kmeans_labels(z, owners, k, seed).tolist()
        )
    counts = [t for _, t in encs]
    label_block = label_fingerprint_features(label_fps)
    for name, z in (
        (
            "head + fingerprint, split by label count (previous default)",
            np.hstack([head, fp_block]),
        ),
        ("fingerprint + label fingerprint, split", np.hstack([fp_block, label_block])),
        (
            "head + fingerprint + label fingerprint, split (default)",
            np.hstack([head, fp_block, label_block]),
        ),
    ):
        result["ari"][name] = clustering_agreement(
            truth, split_kmeans(z, owners, counts, truth, seed)
        )
    default = np.hstack([head, fp_block])
    silhouettes = {
        kk: float(silhouette_score(default, kmeans_labels(default, kk, seed)))
        for kk in range(2, 11)
    }
    result["auto_k"] = {
        "true": k,
        "silhouette (plain K-means, 2..10)": max(silhouettes, key=silhouettes.__getitem__),
        "most tasks on one client (default)": tasks_lower_bound(owners),
    }
    result["client_choice_by_loss"] = _client_choice(
        model, adapters, head, encs, owners, truth, k, seed
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=["stress_binary", "stress_three_way"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/fltac_round1_study"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_studies(study, args.suites, args.seeds, args.out)
    variants = list(results[0]["ari"])
    head = ["variant", *[f"{r['suite']} s{r['seed']}" for r in results]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        lines.append("| " + " | ".join([v, *[f"{r['ari'][v]:.2f}" for r in results]]) + " |")
    for group in ("client_choice_by_loss", "auto_k"):
        for v in results[0][group]:
            lines.append(
                "| "
                + " | ".join(
                    [
                        v,
                        *[
                            str(r[group][v]) if group == "auto_k" else f"{r[group][v]:.2f}"
                            for r in results
                        ],
                    ]
                )
                + " |"
            )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
