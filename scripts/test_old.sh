#!/usr/bin/env bash
# The old model's self-test, as the original release's test_old.sh:
#   bash scripts/test_old.sh landmark roxford5k ./data/ROxfordParis/ [KEY VALUE ...]
# The model comes from OLD_MODEL_PATH / OLD_MODEL_ARCH (defaults as scripts/test.sh); everything else, test
# sets included, as scripts/test.sh, whose "old self" line gives the same numbers.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: bash scripts/test_old.sh landmark {roxford5k,rparis6k,gldv2}[,...] DATA_ROOT[,...] [KEY VALUE ...]" >&2
  exit 2
fi
export NEW_MODEL_PATH="${OLD_MODEL_PATH:-./output/final_model/resnet18_30class_oldmodel.pth.tar}"
export NEW_MODEL_ARCH="${OLD_MODEL_ARCH:-resnet18}"
exec bash "$(dirname "$0")/test.sh" "$@" OLD_MODEL.WEIGHTS ""
