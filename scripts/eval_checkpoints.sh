#!/usr/bin/env bash
# Judge saved checkpoints against a baseline model on several user styles
# (auxiliary/eval_checkpoints.py). Writes results.json, completions.jsonl and winrate.png.
#   CHECKPOINTS="/runs/a/checkpoints/step_000015 /runs/offline" BASELINE_MODEL=Qwen/Qwen3-8B \
#       scripts/eval_checkpoints.sh
#   ... JUDGE=claude scripts/eval_checkpoints.sh --claude_model claude-haiku-4-5-20251001
# A checkpoint is a model folder, a LoRA adapter folder, an online step_N/ folder, or a folder of
# step_N/ folders. `--help` lists every variable; `--dry-run` prints the command and runs nothing.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_profile configs/wrappers/eval_checkpoints.yaml
sdpo_field CHECKPOINTS --checkpoints "(required)"
sdpo_field BASELINE_MODEL --baseline_model "(required)"
sdpo_field EVAL_STYLES --eval_styles
sdpo_field JUDGE --judge
sdpo_field USER_MODEL --judge_model
sdpo_field EVAL_N --eval_n
sdpo_field DATA_DIR --data_dir
sdpo_field BASE_MODEL --base_model
sdpo_config_var
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/eval_checkpoints_$(sdpo_run_tag)" \
    "results.json, completions.jsonl, winrate.png" "\$BASE_WORK/sdpo_outputs/eval_checkpoints_<job id or time>"
sdpo_help_or_continue "Checkpoint evaluation: pairwise style win rates of each checkpoint against a baseline."

sdpo_config_sets checkpoints || sdpo_require CHECKPOINTS
sdpo_config_sets baseline_model || sdpo_require BASELINE_MODEL
sdpo_check_choice JUDGE rule local claude vllm
sdpo_check_int EVAL_N 1
sdpo_check_api_key JUDGE:judge
sdpo_input_paths CHECKPOINTS
sdpo_input_path BASELINE_MODEL
sdpo_input_path BASE_MODEL
sdpo_input_path DATA_DIR
sdpo_output_path OUTPUT_DIR
[[ -z $DATA_DIR ]] || sdpo_config_sets val_jsonl || sdpo_check_exists DATA_DIR file validation.jsonl

sdpo_python "$REPO_ROOT/auxiliary/eval_checkpoints.py"
sdpo_words_flag --checkpoints CHECKPOINTS
sdpo_flag --baseline_model BASELINE_MODEL
sdpo_words_flag --eval_styles EVAL_STYLES
sdpo_flag --judge JUDGE
sdpo_flag --judge_model USER_MODEL
sdpo_flag --eval_n EVAL_N
sdpo_flag --data_dir DATA_DIR
sdpo_flag --base_model BASE_MODEL
sdpo_output_dir_flag
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
