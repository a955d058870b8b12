#!/usr/bin/env bash
# Prepared GPU check (no network needed): Qwen3-0.6B, 1.7B (full fine-tuning) and 8B (full
# fine-tuning and LoRA r 256) shapes, random weights, bf16 online updates per loss mode with our
# objective (fused and checkpointed head), the straightforward path and TRL's path.
# Prints the environment, a table (update time, response tokens/s, peak GPU memory) and `ratio` lines.
#
#   bash bench/gpu_check.sh                         # CUDA, full check (< 5 minutes on one H100/H200)
#   bash bench/gpu_check.sh --device cpu --tiny     # CPU smoke run (tiny model, full and LoRA r 8)
#   bash bench/gpu_check.sh --models qwen3-0.6b --out gpu.json
# Any flag is passed on to bench/gpu_check.py (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # sdpo_objective and auxiliary from this checkout

# The project venv where it exists and works, else the machine's python3 (the GPU image has torch there).
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, transformers" 2>/dev/null; then
  PY=.venv/bin/python
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_check.py "$@"
