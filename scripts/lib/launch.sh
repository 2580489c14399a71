# Sourced by the scripts: pick the Python and launch an entry point on NGPUS processes via torchrun.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"
else PYTHON="$(command -v python3)"; fi

visible_gpus() {
  "$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0
}

# launch TOOL.py ARGS... : torchrun --nproc_per_node=${NGPUS:-<visible GPUs, or 1>} (gloo on CPU, NCCL on GPU)
launch() {
  local nproc="${NGPUS:-}"
  if [[ -z "$nproc" ]]; then
    nproc="$(visible_gpus)"
    [[ "$nproc" -ge 1 ]] || nproc=1
  fi
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$@"
}
