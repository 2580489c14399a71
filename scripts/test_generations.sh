#!/usr/bin/env bash
# The compatibility matrix of a chain of model generations, C[i][j] = queries by model i against a gallery by
# model j (i >= j), with its AC and AM, on one or several test sets (arguments as scripts/test.sh):
#   bash scripts/test_generations.sh landmark rparis6k,roxford5k ./data/ROxfordParis \
#     GENERATIONS.WEIGHTS [gen1.pth,gen2.pth,gen3.pth] GENERATIONS.ARCHS [resnet18,resnet18,resnet50] \
#     EVAL.SAVE_DIR ./output/generations/matrix
# Writes matrix.json, matrix.md and matrix.png under EVAL.SAVE_DIR; NGPUS processes.
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"

if [[ $# -lt 3 ]]; then
  echo "usage: bash scripts/test_generations.sh landmark {roxford5k,rparis6k,gldv2}[,...] DATA_ROOT[,...] GENERATIONS.WEIGHTS [a.pth,b.pth,...] [KEY VALUE ...]" >&2
  exit 2
fi
launch "$REPO/tools/test_generations.py" --cfg "$REPO/configs/test_model.yml" \
  EVAL.DATASET_TYPE "$1" EVAL.DATASET "$2" EVAL.ROOT "$3" "${@:4}"
