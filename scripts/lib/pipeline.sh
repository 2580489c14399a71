# Sourced by demo.sh / reproduce_*.sh: resumable steps. A step whose output exists is skipped (every
# output is written atomically, so existing means complete); a failing step stops the script with the
# step's name and log path, and the steps completed before it stay as they are.
set -o pipefail

# run_step NAME OUTPUT LOG CMD... : run CMD (output shown and kept in LOG) unless OUTPUT exists
run_step() {
  local name="$1" output="$2" log="$3"; shift 3
  if [[ -e "$output" ]]; then
    echo "[done] $name  ($output)"
    return 0
  fi
  mkdir -p "$(dirname "$log")"
  echo "[run]  $name  (log: $log)"
  if ! "$@" 2>&1 | tee "$log"; then
    echo "error: step '$name' failed; log: $log" >&2
    exit 1
  fi
  if [[ ! -e "$output" ]]; then
    echo "error: step '$name' ended without writing $output; log: $log" >&2
    exit 1
  fi
}

# stamp_outputs SOURCE DIR... : key each output DIR on the data it is built from. The first run writes
# SOURCE's sha256 to DIR/BENCHMARK.sha256; a later run whose SOURCE (a synthetic benchmark's SYNTHETIC.json,
# the real GLDv2 train list) has changed stops in one line instead of silently reusing models trained on
# the other data. Every DIR is checked before any is stamped, so a refused run writes nothing. A DIR that
# already holds outputs but no stamp (made before stamps existed) is adopted.
stamp_outputs() {
  local source="$1" sum have dir; shift
  [[ -f "$source" ]] || { echo "error: $source not found: cannot key the outputs on it" >&2; exit 2; }
  sum="$(sha256sum <"$source")"; sum="${sum%% *}"
  for dir in "$@"; do
    [[ -f "$dir/BENCHMARK.sha256" ]] || continue
    read -r have _ <"$dir/BENCHMARK.sha256" || true
    if [[ "$have" != "$sum" ]]; then
      echo "error: $dir was built from another $source (sha256 ${have:0:12}..., now ${sum:0:12}...): move $dir away to rebuild it, or restore that data" >&2
      exit 2
    fi
  done
  for dir in "$@"; do
    [[ -f "$dir/BENCHMARK.sha256" ]] && continue
    # (a fresh block's first step has already written its log under DIR/logs: that is not an output)
    if [[ -d "$dir" && -n "$(ls -A "$dir" | grep -vx logs)" ]]; then
      echo "[note] $dir has no BENCHMARK.sha256: keying it on the current $source"
    fi
    mkdir -p "$dir"
    echo "$sum  $source" >"$dir/BENCHMARK.sha256.tmp" && mv "$dir/BENCHMARK.sha256.tmp" "$dir/BENCHMARK.sha256"
  done
}

# the config overrides that point the synthetic configs at DATA (a make_synthetic.py output folder)
synthetic_overrides() {
  local data="$1" alloc="$2"
  echo DATA.ROOT "$data/gldv2" \
       DATA.TRAIN_LIST "$data/gldv2/gldv2_train_new_100percent_$alloc.txt" \
       META.TRAIN_LIST "$data/gldv2/gldv2_train_old_30percent_$alloc.txt" \
       EVAL.ROOT "$data/ROxfordParis"
}

# synthetic_train_list DATA : the full GLDv2 train list of the benchmark in DATA (relative to DATA); a
# benchmark of another format version (without pretrain/) stops the script with how to regenerate it
synthetic_train_list() {
  "$PYTHON" -c "import sys
from advbct.cli import guarded
from advbct.data.synthetic import read_summary
guarded(lambda: print(read_summary(sys.argv[1])['gldv2']['train_list']))()" "$1"
}

# pretrain_backbone r18|r50 DATA DIR LOG [KEY VALUE ...] : step training the synthetic stand-in for
# ImageNet weights (configs/synthetic/pretrain_<bb>.yml: a classifier on DATA/pretrain, landmarks disjoint
# from every other part) into DIR/final.pth; STEP_PREFIX (e.g. "2/9 ") numbers the step in the log
pretrain_backbone() {
  local bb="$1" data="$2" dir="$3" log="$4"
  run_step "${STEP_PREFIX:-}pretrain backbone ($bb, $data/pretrain)" "$dir/final.pth" "$log" \
    bash scripts/train_new.sh "configs/synthetic/pretrain_$bb.yml" DATA.ROOT "$data/pretrain" \
    DATA.TRAIN_LIST "$data/pretrain/train_list.txt" OUTPUT "$dir" "${@:5}"
}

# test_root DATA_ROOT_REVISITED DATA_ROOT_GLDV2 DATASET : the root scripts/test.sh expects
test_root() {
  if [[ "$3" == gldv2 ]]; then echo "$2"; else echo "$1"; fi
}

TEST_SETS=(rparis6k roxford5k gldv2)

# test_step LABEL NEW_CKPT NEW_ARCH OLD_CKPT EVAL_DIR LOG REVISITED_ROOT GLDV2_ROOT [KEY VALUE ...] : one step
# testing NEW against OLD on every set of TEST_SETS whose EVAL_DIR/<set>/results.json is missing, all in
# one scripts/test.sh process (the models are loaded once, each set's results written as it is scored)
test_step() {
  local label="$1" new="$2" arch="$3" old="$4" dir="$5" log="$6" rev="$7" gld="$8" ds todo=() roots=()
  shift 8
  for ds in "${TEST_SETS[@]}"; do
    [[ -e "$dir/$ds/results.json" ]] && continue
    todo+=("$ds"); roots+=("$(test_root "$rev" "$gld" "$ds")")
  done
  if [[ ${#todo[@]} -eq 0 ]]; then
    echo "[done] $label  ($dir/{$(IFS=,; echo "${TEST_SETS[*]}")}/results.json)"
    return 0
  fi
  # one set alone writes SAVE_DIR/results.json, several write SAVE_DIR/<set>/results.json
  local save="$dir"; [[ ${#todo[@]} -gt 1 ]] || save="$dir/${todo[0]}"
  run_step "$label on $(IFS=,; echo "${todo[*]}")" "$dir/${todo[-1]}/results.json" "$log" \
    env NEW_MODEL_PATH="$new" OLD_MODEL_PATH="$old" NEW_MODEL_ARCH="$arch" \
    bash scripts/test.sh landmark "$(IFS=,; echo "${todo[*]}")" "$(IFS=,; echo "${roots[*]}")" "$@" \
    EVAL.SAVE_DIR "$save"
}

# config_value CONFIG KEY [KEY VALUE ...] : the resolved value of KEY (e.g. MODEL.ARCH) in CONFIG
config_value() {
  "$PYTHON" -c "import sys
from advbct.cli import guarded
from advbct.config import load_config
def main():
    node = load_config(sys.argv[1], sys.argv[3:])
    for part in sys.argv[2].split('.'):
        node = node[part]
    print(node)
guarded(main)()" "$@"
}

# old_checkpoint_name OLD_CONFIG EPOCH [KEY VALUE ...] : the checkpoint the old model's training leaves for
# EPOCH (final.pth for its last epoch, epoch_N.pth every TRAIN.SAVE_FREQ epochs); any other EPOCH stops
# the script in one line listing the epochs it keeps
old_checkpoint_name() {
  "$PYTHON" -c "import sys
from advbct.cli import guarded
from advbct.config import load_config
from advbct.errors import UserError
def main():
    train = load_config(sys.argv[1], sys.argv[3:]).TRAIN
    kept = sorted(set(range(train.SAVE_FREQ, train.EPOCHS + 1, train.SAVE_FREQ)) | {train.EPOCHS})
    epoch = sys.argv[2]
    if not epoch.isdigit() or int(epoch) not in kept:
        raise UserError(f'--old-epoch {epoch}: the old model ({sys.argv[1]}) keeps the checkpoints of epochs '
                        f'{\", \".join(map(str, kept))} (TRAIN.SAVE_FREQ {train.SAVE_FREQ}, TRAIN.EPOCHS {train.EPOCHS})')
    print('final.pth' if int(epoch) == train.EPOCHS else f'epoch_{int(epoch)}.pth')
guarded(main)()" "$@"
}
