# Sourced by the scripts: pick the Python and launch an entry point on NGPUS processes.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"
else PYTHON="$(command -v python3)"; fi

visible_gpus() {
  # no NVIDIA driver: no GPU, without paying for a torch import (seconds) on CPU machines
  if ! command -v nvidia-smi >/dev/null 2>&1 && [[ ! -e /dev/nvidia0 ]]; then echo 0; return; fi
  "$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0
}

# launch TOOL.py ARGS... on ${NGPUS:-<visible GPUs, or 1>} processes. One process runs the tool directly
# (world size 1, no launcher); more go through torchrun --standalone (gloo on CPU, NCCL on GPU).
launch() {
  local nproc="${NGPUS:-}"
  if [[ -z "$nproc" ]]; then
    nproc="$(visible_gpus)"
    [[ "$nproc" -ge 1 ]] || nproc=1
  fi
  if [[ "$nproc" -eq 1 ]]; then
    "$PYTHON" "$@"
    return
  fi
  local redirects="0:0" r log_dir rc=0
  for ((r = 1; r < nproc; r++)); do redirects+=",$r:2"; done
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/advbct-launch.XXXXXX")"
  "$PYTHON" -m advbct.launch "$log_dir" --standalone --nproc_per_node="$nproc" \
    --redirects "$redirects" "$@" || rc=$?
  rm -rf "$log_dir"
  return "$rc"
}
