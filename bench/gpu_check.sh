#!/usr/bin/env bash
# Prepared GPU check (no network needed): Qwen3-0.6B, 1.7B (full fine-tuning) and 8B (full
# fine-tuning and LoRA r 256) shapes, random weights, bf16 online updates per loss mode with our
# objective (fused and checkpointed head), the straightforward path and TRL's path.
# Prints the environment, a table (update time, response tokens/s, peak GPU memory) and `ratio` lines.
#
#   bash bench/gpu_check.sh                         # CUDA, full check (< 5 minutes on one H100/H200)
#   bash bench/gpu_check.sh --device cpu --tiny     # CPU smoke run (tiny model, full and LoRA r 8)
#   bash bench/gpu_check.sh --models qwen3-0.6b --out gpu.json
# Then, on CUDA with deepspeed installed, offline SDPO under DeepSpeed ZeRO-2 and ZeRO-3 (tiny model,
# 3 steps each; --no-deepspeed skips it). Any other flag is passed on to bench/gpu_check.py (see --help there).
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
# --no-deepspeed is this script's own flag; everything else goes to gpu_check.py.
check_args=() run_deepspeed=1
for arg in "$@"; do
  if [[ $arg == --no-deepspeed ]]; then run_deepspeed=0; else check_args+=("$arg"); fi
done
"$PY" bench/gpu_check.py ${check_args[@]+"${check_args[@]}"}

# DeepSpeed ZeRO-2 and ZeRO-3 on one GPU: offline SDPO, 3 steps of the tiny model through the
# shipped accelerate configs (on CPU, two processes of both ran in this project's tests: docs/offline.md).
# Skipped on a CPU run, without CUDA or deepspeed, and with --no-deepspeed.
if (( run_deepspeed )) && [[ " $* " != *" --device cpu "* ]] &&
    "$PY" -c "import deepspeed, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  ds_out=$(mktemp -d)
  for stage in 2 3; do
    if "$PY" -m accelerate.commands.launch --num_processes 1 --config_file "offline_sdpo/configs/deepspeed_zero$stage.yaml" \
        offline_sdpo/main_offline_sdpo.py --base_model tiny-random --train_jsonl tests/fixtures/offline/interactions.jsonl \
        --output_dir "$ds_out/zero$stage" --batch_size 2 --grad_accum 1 --max_steps 3 --dtype bf16 > "$ds_out/zero$stage.log" 2>&1; then
      echo "deepspeed zero$stage offline SDPO (tiny model, 3 steps): ok"
    else
      echo "deepspeed zero$stage offline SDPO: FAILED; last lines of $ds_out/zero$stage.log:"; tail -5 "$ds_out/zero$stage.log"
    fi
  done
fi
