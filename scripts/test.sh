#!/usr/bin/env bash
# Self-test and cross-test of a new model against an old one, as the original release:
#   bash scripts/test.sh landmark roxford5k ./data/ROxfordParis/ [KEY VALUE ...]
#   bash scripts/test.sh landmark gldv2 ./data/GLDv2/
#   bash scripts/test.sh landmark rparis6k,roxford5k,gldv2 ./data/ROxfordParis,./data/ROxfordParis,./data/GLDv2
# (several sets, comma-separated, in one process: results under EVAL.SAVE_DIR/<set>/, one root or one per set)
# Models come from NEW_MODEL_PATH / OLD_MODEL_PATH / NEW_MODEL_ARCH / OLD_MODEL_ARCH; NGPUS processes.
# Prints self/cross E/M/H mAP (mAP@100 for gldv2) and writes results.json under EVAL.SAVE_DIR.
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"

if [[ $# -lt 3 ]]; then
  echo "usage: bash scripts/test.sh landmark {roxford5k,rparis6k,gldv2}[,...] DATA_ROOT[,...] [KEY VALUE ...]" >&2
  exit 2
fi
NEW_MODEL_PATH="${NEW_MODEL_PATH:-./output/final_model/resnet18_100class_comp_advbct.pth.tar}"
OLD_MODEL_PATH="${OLD_MODEL_PATH:-./output/final_model/resnet18_30class_oldmodel.pth.tar}"
NEW_MODEL_ARCH="${NEW_MODEL_ARCH:-resnet18}"
OLD_MODEL_ARCH="${OLD_MODEL_ARCH:-resnet18}"

launch "$REPO/tools/test.py" --cfg "$REPO/configs/test_model.yml" \
  NEW_MODEL.ARCH "$NEW_MODEL_ARCH" NEW_MODEL.WEIGHTS "$NEW_MODEL_PATH" \
  OLD_MODEL.ARCH "$OLD_MODEL_ARCH" OLD_MODEL.WEIGHTS "$OLD_MODEL_PATH" \
  EVAL.DATASET_TYPE "$1" EVAL.DATASET "$2" EVAL.ROOT "$3" "${@:4}"
