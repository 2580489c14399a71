# Sourced by reproduce_table.sh / reproduce_ablation.sh: argument parsing, paths, and the steps every
# block shares (synthetic data and pretrained backbones, split, old model, meta, phi*). Expects `usage` to be set.
[[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
ALLOC="$1"; BACKBONE="$2"; shift 2
PRESET=""; OLD_EPOCH=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --synthetic) PRESET="${2:?--synthetic needs a preset (tiny, small, medium)}"; shift 2 ;;
    --old-epoch) OLD_EPOCH="${2:?--old-epoch needs an epoch (e.g. 10, as the release)}"; shift 2 ;;
    *) echo "error: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
case "$ALLOC" in data|class) ;; *) echo "error: unknown allocation '$ALLOC' (expected data or class)" >&2; exit 2 ;; esac
case "$BACKBONE" in r18|r50) ;; *) echo "error: unknown backbone '$BACKBONE' (expected r18 or r50)" >&2; exit 2 ;; esac

source scripts/lib/launch.sh
source scripts/lib/pipeline.sh
BLOCK="${ALLOC}_${BACKBONE}"
PAPER_BLOCK=$([[ $BACKBONE == r18 ]] && echo "$ALLOC" || echo "backbone-$ALLOC")
METHODS=(bct:BCT lce:LCE unibct:UniBCT hot_refresh:HotRefresh advbct:AdvBCT)

if [[ -n "$PRESET" ]]; then
  CFG="configs/synthetic/$BLOCK"
  DATA="${DATA:-./data/synthetic-$PRESET}"
  TAG="_synthetic-$PRESET"
  REV_ROOT="$DATA/ROxfordParis"; GLD_ROOT="$DATA/gldv2"
  read -r -a DATA_OPTS <<<"$(synthetic_overrides "$DATA" "$ALLOC")"
  EVAL_OPTS=(EVAL.IMG_SIZE 64 EVAL.NUM_WORKERS 1 EVAL.BATCH_SIZE 128)
  # the stand-in for ImageNet weights: one pretrained backbone per architecture, shared by every block
  PRETRAIN_ROOT="./output/reproduce/pretrain${TAG}"
  OLD_INIT=(MODEL.PRETRAINED_PATH "$PRETRAIN_ROOT/r18/final.pth")
  NEW_INIT=(MODEL.PRETRAINED_PATH "$PRETRAIN_ROOT/$BACKBONE/final.pth")
else
  CFG="configs/gldv2/$BLOCK"
  DATA=./data/GLDv2; TAG=""
  REV_ROOT=./data/ROxfordParis; GLD_ROOT=./data/GLDv2
  DATA_OPTS=(); EVAL_OPTS=(); OLD_INIT=(); NEW_INIT=()   # ImageNet weights from the torch hub cache
  for need in "$DATA/label_81313.txt" "$REV_ROOT/gnd_roxford5k.pkl" "$REV_ROOT/gnd_rparis6k.pkl" "$GLD_ROOT/gldv2_private_query_gt.txt"; do
    [[ -e "$need" ]] || { echo "error: $need not found: lay out the datasets as in Dataset.md (or use --synthetic PRESET)" >&2; exit 2; }
  done
fi
OLD_CFG="configs/$(basename "$(dirname "$CFG")")/${ALLOC}_r18/old.yml"
OLD_DIR="./output/reproduce/old_${ALLOC}${TAG}"   # shared by the r18 and r50 blocks of one allocation
# Which old model the compatible rows train against and are tested with: by default the final one (the
# paper's protocol), with --old-epoch N its epoch-N checkpoint (the release's compatible configs load epoch
# 10), which the old model's training keeps; such a block gets its own meta and output folder.
OLD="$OLD_DIR/final.pth"; META="$OLD_DIR/meta.pt"; OLD_TAG=""
if [[ -n "$OLD_EPOCH" ]]; then
  old_ckpt="$(old_checkpoint_name "$OLD_CFG" "$OLD_EPOCH" "${DATA_OPTS[@]}")" || exit 2
  OLD="$OLD_DIR/$old_ckpt"
  if [[ "$old_ckpt" != final.pth ]]; then META="$OLD_DIR/meta_epoch$OLD_EPOCH.pt"; OLD_TAG="_old-epoch$OLD_EPOCH"; fi
fi
OUT="./output/reproduce/${BLOCK}${TAG}${OLD_TAG}"
NEW_ARCH="$(config_value "$CFG/independent.yml" MODEL.ARCH)" || exit 2
OLD_ARCH="$(config_value "$OLD_CFG" MODEL.ARCH)" || exit 2
COMPAT=(OLD_MODEL.WEIGHTS "$OLD" COMP_LOSS.META_PATH "$META")
LOGS="$OUT/logs"
start=$SECONDS

prepare_block() {
  if [[ -n "$PRESET" ]]; then
    run_step "synthetic benchmark ($PRESET)" "$DATA/SYNTHETIC.json" "$LOGS/synthetic.log" \
      "$PYTHON" tools/make_synthetic.py --out "$DATA" --preset "$PRESET"
    FULL_LIST="$DATA/$(synthetic_train_list "$DATA")"
    stamp_outputs "$DATA/SYNTHETIC.json" "$PRETRAIN_ROOT" "$OLD_DIR" "$OUT"
    pretrain_backbone r18 "$DATA" "$PRETRAIN_ROOT/r18" "$LOGS/pretrain_r18.log"
    [[ "$BACKBONE" == r18 ]] || pretrain_backbone "$BACKBONE" "$DATA" "$PRETRAIN_ROOT/$BACKBONE" "$LOGS/pretrain_$BACKBONE.log"
  else
    FULL_LIST="$DATA/label_81313.txt"
    stamp_outputs "$FULL_LIST" "$OLD_DIR" "$OUT"
  fi
  run_step "split by $ALLOC (30 % old)" "$(dirname "$FULL_LIST")/gldv2_train_new_100percent_$ALLOC.txt" "$LOGS/split.log" \
    "$PYTHON" tools/split_dataset.py --list "$FULL_LIST" --by "$ALLOC" --ratio 0.3
  run_step "old model (R18, $ALLOC allocation)" "$OLD_DIR/final.pth" "$LOGS/old.log" \
    bash scripts/train_old.sh "$OLD_CFG" "${DATA_OPTS[@]}" "${OLD_INIT[@]}" \
    DATA.TRAIN_LIST "$(dirname "$FULL_LIST")/gldv2_train_old_30percent_$ALLOC.txt" OUTPUT "$OLD_DIR"
  run_step "old-class meta" "$META" "$LOGS/meta.log" \
    bash scripts/extract_meta.sh "$CFG/advbct.yml" "${DATA_OPTS[@]}" "${COMPAT[@]}"
  run_step "phi* ($BACKBONE)" "$OUT/independent/final.pth" "$LOGS/independent.log" \
    bash scripts/train_new.sh "$CFG/independent.yml" "${DATA_OPTS[@]}" "${NEW_INIT[@]}" OUTPUT "$OUT/independent"
}

# evaluate_model NAME : self/cross/backfill of $OUT/NAME/final.pth against the old model on every test set,
# in one process; the old model's features are embedded by the first model tested and read back by the others
evaluate_model() {
  test_step "test $1" "$OUT/$1/final.pth" "$NEW_ARCH" "$OLD" "$OUT/eval/$1" "$LOGS/test_$1.log" "$REV_ROOT" "$GLD_ROOT" \
    "${EVAL_OPTS[@]}" OLD_MODEL.ARCH "$OLD_ARCH" EVAL.BACKFILL true EVAL.OLD_FEATURES_CACHE "$OUT/eval/old_features"
}
