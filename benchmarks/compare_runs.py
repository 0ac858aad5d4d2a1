"""Compare two run folders round by round: are their metrics the same, and where do they part?

Times and per-node entries are left out (node ids are drawn anew by every federation); every
other value of ``metrics.jsonl`` is compared exactly (a key absent from one line and null in the
other counts as equal), and the saved adapters (FL-TAC) or shared
model (MoE methods) tensor by tensor.

Usage::

    python benchmarks/compare_runs.py RUN_A RUN_B
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

SKIPPED = re.compile(r"time|aggregate_s|per_node|node")  # keys whose values differ by construction


def differences(a: Any, b: Any, path: str = "") -> tuple[int, list[str]]:
    """(values compared, the paths where ``a`` and ``b`` differ) over nested dicts and lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        compared, where = 0, list[str]()
        for key in sorted(set(a) | set(b)):
            if SKIPPED.search(key) or key.isdigit():
                continue
            # An absent key and a null count as one: typed round records leave out unset keys.
            n, w = differences(a.get(key), b.get(key), f"{path}.{key}")
            compared, where = compared + n, where + w
        return compared, where
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        compared, where = 0, list[str]()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            n, w = differences(x, y, f"{path}[{i}]")
            compared, where = compared + n, where + w
        return compared, where
    return 1, ([] if a == b else [path])


def tensors_equal(a: Path, b: Path) -> bool | None:
    """Whether every ``*.safetensors`` file under ``a`` equals its namesake under ``b``."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors") if "nodes" not in p.parts)
    if not files:
        return None
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel)) if (b / rel).exists() else {}
        if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in x):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    rounds = [
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (args.run_a, args.run_b)
    ]
    for i, (x, y) in enumerate(zip(*rounds, strict=False), start=1):
        compared, where = differences(x, y)
        print(f"round {i}: {compared - len(where)} of {compared} values equal", *where[:5])
    print(f"rounds: {len(rounds[0])} and {len(rounds[1])}")
    print("saved tensors equal:", tensors_equal(args.run_a, args.run_b))


if __name__ == "__main__":
    main()
