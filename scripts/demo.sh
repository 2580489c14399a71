#!/usr/bin/env bash
# The main job on the embedded synthetic benchmark, start to finish (about 10 minutes on 2 CPU cores with bf16
# instructions, longer without: README.md):
#   bash scripts/demo.sh
# 0 installs into .venv if needed, 1 writes the `small` synthetic benchmark, 2 pretrains the ResNet-18
# backbone both models start from (the stand-in for ImageNet weights), 3 splits off 30 % of the classes,
# 4 trains the old ResNet-18, 5 extracts its class meta, 6 trains phi* and 7 an AdvBCT new model,
# 8 evaluates both against the old model on rparis6k, roxford5k and gldv2 (synthetic) and 9 prints the
# table with P_up / P_comp / P_1 and whether the compatibility criterion holds.
# Results: output/demo/ (table.json in the schema of paper_table.json). Re-running skips finished steps
# and continues a training killed part-way through from its last full epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/venv.sh
ensure_venv
source scripts/lib/launch.sh
# the steps: advbct/pipelines/demo.py (settings PRESET, DATA, OUT, NGPUS from the environment)
exec "$PYTHON" -m advbct.pipelines demo "$@"
