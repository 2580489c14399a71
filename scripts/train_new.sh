#!/usr/bin/env bash
# Train a new model (phi* when COMP_LOSS.TYPE is empty, else compatible with the old model):
#   bash scripts/train_new.sh configs/data_r18/advbct.yml [KEY VALUE ...]
# Runs on NGPUS processes through torchrun (default: visible GPUs, or 1 process on CPU with gloo).
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
[[ $# -ge 1 ]] || { echo "usage: bash scripts/train_new.sh CONFIG.yml [KEY VALUE ...]" >&2; exit 2; }
launch "$REPO/tools/train.py" --cfg "$1" "${@:2}"
