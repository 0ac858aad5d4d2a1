#!/usr/bin/env bash
# Lint, type-check and test (unit tests, then end-to-end Flower simulations).
# Tests marked slow (failure-and-recovery runs of minutes each) are left out: CI must stay under
# 20 minutes on 2 cores. `bash scripts/test.sh -m slow` runs them (a later -m wins).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m ruff check .
python -m ruff format --check .
python -m mypy
python -m pytest -q -m "not slow" "$@"
