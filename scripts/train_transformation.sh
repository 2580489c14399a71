#!/usr/bin/env bash
# Embed DATA.TRAIN_LIST with the old model (OLD_MODEL.WEIGHTS) and the new one (NEW_MODEL.WEIGHTS, default
# OUTPUT/final.pth) and fit the map of old embeddings into the new space (TRANSFORM.TYPE fct | procrustes),
# written to OUTPUT/transformation.pth:
#   bash scripts/train_transformation.sh configs/synthetic/class_r18/fct.yml [KEY VALUE ...]
# Evaluate with it: bash scripts/test.sh ... EVAL.OLD_TRANSFORM OUTPUT/transformation.pth
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
[[ $# -ge 1 ]] || { echo "usage: bash scripts/train_transformation.sh CONFIG.yml [KEY VALUE ...]" >&2; exit 2; }
launch "$REPO/tools/train_transformation.py" --cfg "$1" "${@:2}"
