#!/usr/bin/env bash
# SFT baseline on logged interactions (offline_sdpo/main_offline_sft.py): the same JSONL, variables,
# launchers (WORLD_SIZE, ACCELERATE_CONFIG, multi-node) and --dry-run as scripts/train_offline_sdpo.sh,
# whose body this runs; only the entry point and the default OUTPUT_DIR name (offline_sft_...) differ.
#   TRAIN_JSONL=data/wildfeedback/wildfeedback_interactions.jsonl scripts/train_offline_sft.sh
#   WORLD_SIZE=1 TRAIN_JSONL=... scripts/train_offline_sft.sh --use_lora --max_steps 10
set -euo pipefail
OFFLINE_TRAINER=sft
# shellcheck source=scripts/train_offline_sdpo.sh
source "$(dirname "${BASH_SOURCE[0]}")/train_offline_sdpo.sh"
