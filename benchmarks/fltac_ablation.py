"""FL-TAC's open choices on the default benchmark: what K-means sees, and the pooling.

Each variant is a full ``flwr run`` of FL-TAC (one seed, 10 SuperNodes) with a few overrides; the
table shows clustering agreement (adjusted Rand index) per round and the final accuracy.

Usage::

    python benchmarks/fltac_ablation.py --out runs/fltac_ablation --seed 1 \
        --reuse-default runs/fltac_default/fltac-s1
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from runner import run_all

VARIANTS = {
    "default": ("constrained K-means, head, cumulative (default)", ""),
    "paper_kmeans_weights_all": (
        "K-means on raw weights of all tensors, unnormalised (the public re-implementation)",
        "fltac.clustering=kmeans fltac.feature_source=weights fltac.feature_tensors=all "
        "fltac.normalize=false",
    ),
    "update_features": (
        "constrained K-means, head, update since what the slot received",
        "fltac.feature_source=update",
    ),
    "kmeans_head": (
        "plain K-means, head, cumulative",
        "fltac.clustering=kmeans",
    ),
    "cls_pooler": (
        "default clustering, CLS pooler instead of mean pooling",
        "model.pooling=cls",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fltac_ablation"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument(
        "--reuse-default", type=Path, help="an existing default FL-TAC run folder (same seed)"
    )
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.reuse_default and not (out / "default").exists():
        shutil.copytree(args.reuse_default, out / "default")
    run_all(
        out,
        {v: f"method=fltac seed={args.seed} {VARIANTS[v][1]}" for v in args.variants},
    )
    lines = [
        "| variant | overrides | ARI per round | mean accuracy |",
        "|---|---|---|---|",
    ]
    for variant in args.variants:
        path = out / variant / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        aris = " ".join(f"{a:.2f}" for a in summary["clustering_agreement_per_round"])
        lines.append(
            f"| {VARIANTS[variant][0]} | `{VARIANTS[variant][1] or '(none)'}` | {aris} | "
            f"{summary['mean_accuracy']:.3f} |"
        )
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
