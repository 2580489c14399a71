#!/usr/bin/env bash
# One block of the paper's main table, end to end:
#   bash scripts/reproduce_table.sh {data,class} {r18,r50} [--synthetic PRESET] [--old-epoch N]
# trains (or reuses) the old R18, extracts its meta, trains phi* and BCT, LCE, UniBCT, Hot-refresh,
# AdvBCT, evaluates every model on rparis6k, roxford5k and gldv2 (self, cross, backfilling curve) and
# writes output/reproduce/<alloc>_<backbone>[_synthetic-<preset>]/table.{md,json} in the paper's layout
# (beside the paper's numbers on the real datasets) and backfill.{json,png}. Finished steps are skipped,
# so an interrupted run continues where it stopped. NGPUS processes per step (default: visible GPUs or 1).
# The compatible rows use the old model's final checkpoint; --old-epoch N uses its epoch-N checkpoint instead
# (10: the release's configs), with its own meta and output/reproduce/<block>[...]_old-epochN/.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/reproduce_table.sh {data,class} {r18,r50} [--synthetic PRESET] [--old-epoch N]"
source scripts/lib/block.sh
prepare_block
for entry in "${METHODS[@]}"; do
  m="${entry%%:*}"
  run_step "$m ($BACKBONE)" "$OUT/$m/final.pth" "$LOGS/$m.log" \
    bash scripts/train_new.sh "$CFG/$m.yml" "${DATA_OPTS[@]}" "${NEW_INIT[@]}" "${COMPAT[@]}" OUTPUT "$OUT/$m"
done
for model in independent "${METHODS[@]%%:*}"; do evaluate_model "$model"; done
method_args=()
for entry in "${METHODS[@]}"; do method_args+=(--method "${entry#*:}=$OUT/eval/${entry%%:*}"); done
ref_args=()
[[ -z "$PRESET" && -f ../shared/data/paper_table.json ]] && ref_args=(--reference ../shared/data/paper_table.json)
echo "[run]  table"
"$PYTHON" tools/collect_results.py --independent "$OUT/eval/independent" "${method_args[@]}" \
  --block "$PAPER_BLOCK" --description "$BLOCK${TAG}" --out "$OUT/table.json" --markdown "$OUT/table.md" \
  --criterion "${ref_args[@]}"
"$PYTHON" tools/plot_backfill.py --eval-dir "$OUT/eval" --out "$OUT/backfill"
echo "block $BLOCK$TAG finished in $((SECONDS - start)) s: $OUT/table.md"
