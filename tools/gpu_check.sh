#!/usr/bin/env bash
# The GPU check, on a machine with 1-8 NVIDIA GPUs (an 8-minute budget; docs/BENCHMARKS.md, "GPU check"):
#   bash tools/gpu_check.sh [--out output/gpu_check/gpu_check.json] [--steps pipeline,training,losses,search,collectives,decoding]
#                           [--ngpus N] [--tolerance 3] [--keep-work] [--cpu-dry-run]
# a: the tiny synthetic pipeline through the bash scripts on every visible GPU (NCCL) against the same on the
# CPU, b: training step times plain vs AdvBCT, c: compatibility-loss speed-up, d: faiss-gpu search at GLDv2
# scale, e: NCCL all-reduce bus bandwidth, f: nvJPEG decoding on the GPU against PIL (pixels and images/s). Writes the JSON report, prints a summary; exit status 1 when a
# step failed, 2 without a visible GPU (--cpu-dry-run: the CPU-side logic only, every GPU step skipped).
# Installs into .venv first when needed (faiss-gpu-cu12 where nvidia-smi answers); PYTHON=... skips that.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  source scripts/lib/venv.sh
  ensure_venv
  PYTHON="$(cd "$VENV" && pwd)/bin/python"
fi
source scripts/lib/launch.sh
exec "$PYTHON" tools/gpu_check.py "$@"
