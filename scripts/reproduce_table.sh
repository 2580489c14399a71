#!/usr/bin/env bash
# One block of the paper's main table, end to end:
#   bash scripts/reproduce_table.sh {data,class} {r18,r50} [--synthetic PRESET] [--old-epoch N]
# trains (or reuses) the old R18, extracts its meta, trains phi* and BCT, LCE, UniBCT, Hot-refresh,
# AdvBCT, evaluates every model on rparis6k, roxford5k and gldv2 (self, cross, backfilling curve) and
# writes output/reproduce/<alloc>_<backbone>[_synthetic-<preset>]/table.{md,json} in the paper's layout
# (beside the paper's numbers on the real datasets) and backfill.{json,png}. Finished steps are skipped,
# so an interrupted run continues where it stopped (a killed training from its last full epoch). NGPUS
# processes per step (default: visible GPUs or 1).
# The compatible rows use the old model's final checkpoint; --old-epoch N uses its epoch-N checkpoint instead
# (10: the release's configs), with its own meta and output/reproduce/<block>[...]_old-epochN/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/launch.sh
# the steps: advbct/pipelines/blocks.py (DATA: the synthetic benchmark's folder, default ./data/synthetic-<preset>)
exec "$PYTHON" -m advbct.pipelines table "$@"
