#!/usr/bin/env bash
# Both embedded defaults on a GPU, next to the same runs on this machine's CPUs: a few minutes.
#
# Each method's default (FL-TAC on the offline text suite, FedMoE-DA on the offline image
# domains; 10 clients) runs for ROUNDS rounds in Flower's simulation engine, first with
# train.device=cpu, then with train.device=cuda and a share of the GPU per ClientApp
# (client-resources-num-gpus), on a local simulation SuperLink started and stopped by PID.
# Each run's real status is read from the SuperLink, its round times from its metrics.jsonl;
# the table goes to stdout and to $OUT/gpu_check.md.
#
#   bash scripts/gpu_check.sh                 # ROUNDS=2, OUT=runs/gpu_check, GPU_SHARE=0.1
#   ROUNDS=3 GPU_SHARE=0.2 bash scripts/gpu_check.sh
#   DEVICES=cpu bash scripts/gpu_check.sh     # the CPU half only (what a machine without a GPU can check)
#
# Install torch with CUDA your own way first (https://pytorch.org), then
# FEDSPECIALISTS_TORCH=skip bash scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDS="${ROUNDS:-2}" OUT="${OUT:-runs/gpu_check}" GPU_SHARE="${GPU_SHARE:-0.1}"
export DEVICES="${DEVICES:-cpu cuda}"
python - <<'EOF'
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from fedspecialists.run.local import local_superlink, run_app

rounds, out = int(os.environ["ROUNDS"]), Path(os.environ["OUT"]).resolve()
devices = os.environ["DEVICES"].split()
if "cuda" in devices and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no GPU (torch.cuda.is_available() is False); "
             "install a CUDA build of torch, or run with DEVICES=cpu")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
cores = os.cpu_count() or 1
resources = {
    "cpu": f"client-resources-num-cpus={cores} client-resources-num-gpus=0",
    "cuda": f"client-resources-num-cpus=1 client-resources-num-gpus={os.environ['GPU_SHARE']}",
}
rows = []
out.mkdir(parents=True, exist_ok=True)
with local_superlink(out / "flwr-home") as link:
    for method in ("fltac", "fedmoe_da"):
        for device in devices:
            name = f"{method}-{device}"
            outcome = run_app(
                link,
                f"method={method} num_rounds={rounds} train.device={device} "
                f"output.root={out} output.name={name}",
                num_supernodes=10,
                federation_config=resources[device],
            )
            metrics = out / name / "metrics.jsonl"
            times = [json.loads(x)["round_time_s"] for x in metrics.read_text().splitlines()] \
                if metrics.exists() else []
            later = f"{statistics.mean(times[1:]):.1f}" if len(times) > 1 else "n/a"
            first = f"{times[0]:.1f}" if times else "n/a"
            rows.append(f"| {method} | {device} | {outcome.status} | {first} | {later} |")
            print(rows[-1], flush=True)
table = "\n".join(
    [f"GPU: {gpu}; CPU cores: {cores}; {rounds} rounds, 10 clients, GPU share per ClientApp "
     f"{os.environ['GPU_SHARE']}", "",
     "| method | device | status | round 1 (s) | later rounds, mean (s) |",
     "|---|---|---|---|---|", *rows]
)
(out / "gpu_check.md").write_text(table + "\n")
print(table)
EOF
