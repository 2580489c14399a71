#!/usr/bin/env bash
# Embed the old training list (META.TRAIN_LIST) with the old model and write the class meta file
# (COMP_LOSS.META_PATH):  bash scripts/extract_meta.sh configs/data_r18/advbct.yml [KEY VALUE ...]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
[[ $# -ge 1 ]] || { echo "usage: bash scripts/extract_meta.sh CONFIG.yml [KEY VALUE ...]" >&2; exit 2; }
launch "$REPO/tools/extract_meta.py" --cfg "$1" "${@:2}"
