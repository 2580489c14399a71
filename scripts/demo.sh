#!/usr/bin/env bash
# The main job on the embedded synthetic benchmark, start to finish (about 10 minutes on 2 CPU cores with bf16
# instructions, longer without: README.md):
#   bash scripts/demo.sh
# 0 installs into .venv if needed, 1 writes the `small` synthetic benchmark, 2 pretrains the ResNet-18
# backbone both models start from (the stand-in for ImageNet weights), 3 splits off 30 % of the classes,
# 4 trains the old ResNet-18, 5 extracts its class meta, 6 trains phi* and 7 an AdvBCT new model,
# 8 evaluates both against the old model on rparis6k, roxford5k and gldv2 (synthetic) and 9 prints the
# table with P_up / P_comp / P_1 and whether the compatibility criterion holds.
# Results: output/demo/ (table.json in the schema of paper_table.json). Re-running skips finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/venv.sh
ensure_venv
source scripts/lib/launch.sh
source scripts/lib/pipeline.sh

PRESET="${PRESET:-small}"
DATA="${DATA:-./data/synthetic-$PRESET}"
OUT="${OUT:-./output/demo}"
CFG=configs/synthetic/class_r18
export NGPUS="${NGPUS:-1}"
OLD="$OUT/old/final.pth"
META="$OUT/old/meta.pt"
read -r -a SYN <<<"$(synthetic_overrides "$DATA" class)"
COMPAT=(OLD_MODEL.WEIGHTS "$OLD" COMP_LOSS.META_PATH "$META")
INIT=(MODEL.PRETRAINED_PATH "$OUT/pretrain/final.pth")
start=$SECONDS

run_step "1/9 synthetic benchmark ($PRESET)" "$DATA/SYNTHETIC.json" "$OUT/logs/synthetic.log" \
  "$PYTHON" tools/make_synthetic.py --out "$DATA" --preset "$PRESET"
train_list="$(synthetic_train_list "$DATA")"
stamp_outputs "$DATA/SYNTHETIC.json" "$OUT"
STEP_PREFIX="2/9 " pretrain_backbone r18 "$DATA" "$OUT/pretrain" "$OUT/logs/pretrain.log"
run_step "3/9 class split (30 % old)" "$DATA/gldv2/gldv2_train_new_100percent_class.txt" "$OUT/logs/split.log" \
  "$PYTHON" tools/split_dataset.py --list "$DATA/$train_list" --by class --ratio 0.3
run_step "4/9 train old model (R18, 30 % of classes)" "$OLD" "$OUT/logs/old.log" \
  bash scripts/train_old.sh "$CFG/old.yml" "${SYN[@]}" "${INIT[@]}" \
  DATA.TRAIN_LIST "$DATA/gldv2/gldv2_train_old_30percent_class.txt" OUTPUT "$OUT/old"
run_step "5/9 old-class meta" "$META" "$OUT/logs/meta.log" \
  bash scripts/extract_meta.sh "$CFG/advbct.yml" "${SYN[@]}" "${COMPAT[@]}"
run_step "6/9 train phi* (no compatibility)" "$OUT/independent/final.pth" "$OUT/logs/independent.log" \
  bash scripts/train_new.sh "$CFG/independent.yml" "${SYN[@]}" "${INIT[@]}" OUTPUT "$OUT/independent"
run_step "7/9 train AdvBCT new model" "$OUT/advbct/final.pth" "$OUT/logs/advbct.log" \
  bash scripts/train_new.sh "$CFG/advbct.yml" "${SYN[@]}" "${INIT[@]}" "${COMPAT[@]}" OUTPUT "$OUT/advbct"
for model in independent advbct; do
  test_step "8/9 test $model" "$OUT/$model/final.pth" resnet18 "$OLD" "$OUT/eval/$model" "$OUT/logs/test_$model.log" \
    "$DATA/ROxfordParis" "$DATA/gldv2" EVAL.IMG_SIZE 64 EVAL.NUM_WORKERS 1 EVAL.BATCH_SIZE 128 EVAL.BACKFILL true \
    EVAL.OLD_FEATURES_CACHE "$OUT/eval/old_features"
done
echo "[run]  9/9 table"
"$PYTHON" tools/collect_results.py --independent "$OUT/eval/independent" --method AdvBCT="$OUT/eval/advbct" \
  --block class --description "synthetic ($PRESET) extended-class: old R18 on 30 % of the classes, new R18" \
  --out "$OUT/table.json" --markdown "$OUT/table.md" --criterion
echo "demo finished in $((SECONDS - start)) s; results in $OUT/ (table.json, table.md, eval/*/*/results.json)"
