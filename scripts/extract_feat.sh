#!/usr/bin/env bash
# The original release's name for the meta step (its README: "run scripts/extract_feat.sh to get feature
# centers with the old model"): the same as scripts/extract_meta.sh, with the release's setting as the
# default config (old ResNet-18 on 30 % of the GLDv2 classes):
#   bash scripts/extract_feat.sh [CONFIG.yml] [KEY VALUE ...]
set -euo pipefail
cfg="${1:-configs/gldv2/class_r18/advbct.yml}"
exec bash "$(dirname "$0")/extract_meta.sh" "$cfg" "${@:2}"
