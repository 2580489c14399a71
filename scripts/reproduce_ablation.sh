#!/usr/bin/env bash
# AdvBCT ablations in one table:
#   bash scripts/reproduce_ablation.sh [{data,class} {r18,r50}] [--synthetic PRESET] [--old-epoch N]   (default: class r18)
# rows: AdvBCT as configured for the block (T = 1.0 on GLDv2, 0.4 on the synthetic benchmark), without the adversarial part, without the elastic boundary (fixed radius
# r_min, as the original code), and thresholds T in {0.4, 0.6, 0.8, 1.0, 1.2}. Shares the old model, meta
# and phi* with scripts/reproduce_table.sh; writes output/reproduce/<block>[_synthetic-<preset>]/ablation.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/launch.sh
# the steps: advbct/pipelines/blocks.py (DATA: the synthetic benchmark's folder, default ./data/synthetic-<preset>)
exec "$PYTHON" -m advbct.pipelines ablation "$@"
