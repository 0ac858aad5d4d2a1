#!/usr/bin/env bash
# Lint, type-check and test (unit tests, then end-to-end Flower simulations).
# Tests marked slow (failure-and-recovery runs of minutes each) are left out: CI must stay under
# 20 minutes on 2 cores. `bash scripts/test.sh -m slow` runs them (a later -m wins).
# Two pytest workers (FEDSPECIALISTS_TEST_WORKERS; 0 runs in this process): a Flower simulation
# keeps 2 cores about 60 % busy (start-up, polls), so two at once fill the gaps. Each worker
# takes whole modules (--dist loadscope), so a module's shared SuperLink and runs start once.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m ruff check .
python -m ruff format --check .
python -m mypy
python -m pytest -q -m "not slow" -n "${FEDSPECIALISTS_TEST_WORKERS:-2}" --dist loadscope "$@"
