#!/usr/bin/env bash
# AdvBCT ablations in one table:
#   bash scripts/reproduce_ablation.sh [{data,class} {r18,r50}] [--synthetic PRESET] [--old-epoch N]   (default: class r18)
# rows: AdvBCT as configured for the block (T = 1.0 on GLDv2, 0.4 on the synthetic benchmark), without the adversarial part, without the elastic boundary (fixed radius
# r_min, as the original code), and thresholds T in {0.4, 0.6, 0.8, 1.0, 1.2}. Shares the old model, meta
# and phi* with scripts/reproduce_table.sh; writes output/reproduce/<block>[_synthetic-<preset>]/ablation.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/reproduce_ablation.sh [{data,class} {r18,r50}] [--synthetic PRESET] [--old-epoch N]"
if [[ $# -eq 0 || "$1" == --* ]]; then set -- class r18 "$@"; fi
source scripts/lib/block.sh
prepare_block
VARIANTS=(
  "advbct:AdvBCT (block config):"
  "advbct_no_adv:w/o adversarial:COMP_LOSS.ADVERSARIAL false"
  "advbct_no_elastic:w/o elastic boundary (fixed r_min):COMP_LOSS.ELASTIC false"
  "advbct_T0.4:T 0.4:COMP_LOSS.THRESHOLD 0.4"
  "advbct_T0.6:T 0.6:COMP_LOSS.THRESHOLD 0.6"
  "advbct_T0.8:T 0.8:COMP_LOSS.THRESHOLD 0.8"
  "advbct_T1.0:T 1.0:COMP_LOSS.THRESHOLD 1.0"
  "advbct_T1.2:T 1.2:COMP_LOSS.THRESHOLD 1.2"
)
# the T row equal to the block's own threshold is the block's AdvBCT model: reuse it instead of retraining
SAME_T="$("$PYTHON" -c "import sys; from advbct.config import load_config
t = load_config(sys.argv[1]).COMP_LOSS.THRESHOLD
print(' '.join(n for n in sys.argv[2:] if n.startswith('advbct_T') and float(n[len('advbct_T'):]) == t))" \
  "$CFG/advbct.yml" "${VARIANTS[@]%%:*}")"
method_args=()
for v in "${VARIANTS[@]}"; do
  IFS=: read -r name label opts <<<"$v"
  read -r -a extra <<<"$opts"  # empty for the block's own config
  if [[ " $SAME_T " == *" $name "* ]]; then
    echo "[same] $name ($BACKBONE) is the block's AdvBCT: reusing $OUT/eval/advbct"
    method_args+=(--method "$label=$OUT/eval/advbct")
    continue
  fi
  run_step "$name ($BACKBONE)" "$OUT/$name/final.pth" "$LOGS/$name.log" \
    bash scripts/train_new.sh "$CFG/advbct.yml" "${DATA_OPTS[@]}" "${NEW_INIT[@]}" "${COMPAT[@]}" "${extra[@]}" OUTPUT "$OUT/$name"
  evaluate_model "$name"
  method_args+=(--method "$label=$OUT/eval/$name")
done
evaluate_model independent
echo "[run]  ablation table"
"$PYTHON" tools/collect_results.py --independent "$OUT/eval/independent" "${method_args[@]}" \
  --block "ablation-$BLOCK" --description "AdvBCT ablations, $BLOCK${TAG}" \
  --out "$OUT/ablation.json" --markdown "$OUT/ablation.md" --criterion
