#!/usr/bin/env bash
# Train the old model phi_o:  bash scripts/train_old.sh configs/data_r18/old.yml [KEY VALUE ...]
# Runs on NGPUS processes through torchrun (default: visible GPUs, or 1 process on CPU with gloo).
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
[[ $# -ge 1 ]] || { echo "usage: bash scripts/train_old.sh CONFIG.yml [KEY VALUE ...]" >&2; exit 2; }
launch "$REPO/tools/train.py" --cfg "$1" "${@:2}"
