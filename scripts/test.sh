#!/usr/bin/env bash
# Lint, type-check and test (unit tests, then end-to-end Flower simulations).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m ruff check .
python -m ruff format --check .
python -m mypy
python -m pytest -q "$@"
