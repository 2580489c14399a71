#!/usr/bin/env bash
# A chain of model generations and its compatibility matrix, end to end:
#   bash scripts/reproduce_generations.sh {data,class} [--methods advbct,bct] [--chain r18:0.3,r18:0.6,r50:1.0] [--synthetic PRESET]
# splits the train list into nested shares (tools/split_dataset.py --chain), trains gen1 (R18 on 30 % by
# default), then per method each later generation compatible with its predecessor (its class meta extracted
# where the method reads it), tests every pair of each chain on rparis6k, roxford5k and gldv2
# (scripts/test_generations.sh: matrix.{json,md,png}) and writes the methods' AC and AM side by side in
# output/generations/<alloc>_<chain>[_synthetic-<preset>]/generations.{md,json}. Finished steps are skipped, a
# killed training continues from its last full epoch. NGPUS processes per step (default: visible GPUs or 1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/launch.sh
# the steps: advbct/pipelines/generations.py (DATA: the synthetic benchmark's folder, default ./data/synthetic-<preset>)
exec "$PYTHON" -m advbct.pipelines generations "$@"
