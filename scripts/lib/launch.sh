# Sourced by the scripts: pick the Python and launch an entry point on NGPUS processes per node
# (one node, several nodes, or an srun step).
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

# _launch_int NAME VALUE MIN: VALUE is an integer >= MIN, else one line naming NAME (exit status 2).
_launch_int() {
  [[ "$2" =~ ^[0-9]+$ && "$2" -ge "$3" ]] && return 0
  echo "error: $1='$2': expected an integer >= $3" >&2
  return 2
}

# launch TOOL.py ARGS... on ${NGPUS:-<visible GPUs, or 1>} processes per node.
# - One node: one process runs the tool directly (world size 1, no launcher); more go through
#   torchrun --standalone (gloo on CPU, NCCL on GPU).
# - Several nodes: the same command on every node with NNODES, NODE_RANK (0..NNODES-1) and MASTER_ADDR
#   (MASTER_PORT, default 29500) of node 0, or with RDZV_ENDPOINT=HOST:PORT (c10d rendezvous, RDZV_ID
#   default "advbct"; node ranks are given on arrival).
# - Inside an srun step of several tasks: one task per node runs one torchrun per node (nodes, node rank,
#   rendezvous host and port from SLURM); several tasks per node run the tool directly, each task one
#   rank (advbct.world turns SLURM's variables into the rank).
# Console: the node of rank 0 shows rank 0; every other rank writes to files under a temporary log folder,
# shown when that rank fails (one line for a user error). With NODE_RANK > 0 all of the node's ranks go to
# files; under RDZV_ENDPOINT the node of rank 0 is known only after the rendezvous, so every node shows
# its local rank 0 (ranks other than 0 log warnings and errors only).
launch() {
  local nproc="${NGPUS:-}" nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}" tasks=1 master
  local addr="${MASTER_ADDR:-}" port="${MASTER_PORT:-29500}"
  local -a where
  [[ -z "${SLURM_STEP_ID:-}" ]] || tasks="${SLURM_STEP_NUM_TASKS:-1}"
  _launch_int SLURM_STEP_NUM_TASKS "$tasks" 1 || return
  [[ -z "$nproc" ]] || _launch_int NGPUS "$nproc" 1 || return
  if [[ "$tasks" -gt 1 && "$tasks" -ne "${SLURM_STEP_NUM_NODES:-0}" ]]; then
    # several tasks per node: each task is one rank, no launcher
    if [[ "${nproc:-1}" -gt 1 ]]; then
      echo "error: NGPUS=$nproc under srun's $tasks tasks on ${SLURM_STEP_NUM_NODES:-?} nodes: every task would start its own torchrun world; run one task per node (srun --ntasks-per-node=1) with NGPUS, or one task per GPU without NGPUS" >&2
      return 2
    fi
    "$PYTHON" "$@"
    return
  fi
  if [[ "$tasks" -gt 1 ]]; then  # one task per node: the nodes of the step are the nodes of the run
    if [[ -n "${NNODES:-}" && "$NNODES" != "$tasks" ]]; then
      echo "error: NNODES=$NNODES but srun started $tasks tasks, one per node: unset NNODES (the step's nodes are the run's nodes)" >&2
      return 2
    fi
    nnodes="$tasks" node_rank="${SLURM_NODEID:-}"
    _launch_int SLURM_NODEID "$node_rank" 0 || return
    if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
      master="$("$PYTHON" -m advbct.world master)" || return
      addr="${master% *}" port="${master##* }"
    fi
  fi
  _launch_int NNODES "$nnodes" 1 || return
  _launch_int NODE_RANK "$node_rank" 0 || return
  _launch_int MASTER_PORT "$port" 1 || return
  if [[ -z "$nproc" ]]; then
    nproc="$(visible_gpus)"
    [[ "$nproc" -ge 1 ]] || nproc=1
  fi
  if [[ "$nproc" -eq 1 && "$nnodes" -eq 1 ]]; then
    "$PYTHON" "$@"
    return
  fi
  local redirects="0:0" r log_dir rc=0
  for ((r = 1; r < nproc; r++)); do redirects+=",$r:2"; done
  if [[ "$nnodes" -eq 1 ]]; then
    where=(--standalone)
  elif [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    where=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-advbct}")
  elif [[ -n "$addr" ]]; then
    if [[ "$node_rank" -ge "$nnodes" ]]; then
      echo "error: NODE_RANK=$node_rank with NNODES=$nnodes: expected 0..$((nnodes - 1))" >&2
      return 2
    fi
    where=(--nnodes="$nnodes" --node_rank="$node_rank" --master_addr="$addr" --master_port="$port")
    [[ "$node_rank" -eq 0 ]] || redirects=3  # rank 0 is on node 0: this node's ranks all write to files
  else
    echo "error: NNODES=$nnodes needs MASTER_ADDR (node 0's address, with NODE_RANK and MASTER_PORT) or RDZV_ENDPOINT=HOST:PORT on every node" >&2
    return 2
  fi
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/advbct-launch.XXXXXX")"
  "$PYTHON" -m advbct.launch "$log_dir" "${where[@]}" --nproc_per_node="$nproc" \
    --redirects "$redirects" "$@" || rc=$?
  rm -rf "$log_dir"
  return "$rc"
}
