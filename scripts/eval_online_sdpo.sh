#!/usr/bin/env bash
# Online SDPO (eval_online_sdpo.py): for each training prompt the policy answers, a simulated user
# replies in its style, and the SDPO signal updates the policy at once; every EVAL_EVERY steps
# (and at the start and the end) a judge compares the policy with the baseline on held-out prompts.
#   scripts/eval_online_sdpo.sh                                   # HelpSteer2, Claude user + judge
#   USER_SIMULATOR=local JUDGE=local USER_MODEL=Qwen/Qwen3-8B STYLE=concise_casual_beginner \
#       DATA_DIR=data/tldr_prompts_unique scripts/eval_online_sdpo.sh
#   USER_SIMULATOR=rule JUDGE=rule MODEL=smollm2-135m-instruct DATA_DIR=data/samples \
#       scripts/eval_online_sdpo.sh                               # free, CPU, no download
# `--help` lists every variable; `--dry-run` prints the command and runs nothing.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_var MODEL "Qwen/Qwen3-8B" "Policy model (HuggingFace ID or local path)"
sdpo_var USER_SIMULATOR "claude" "Who writes the user's follow-ups: rule, local, claude or vllm"
sdpo_var USER_MODEL "Qwen/Qwen3-32B" "User simulator model (local / vllm; a claude-* id picks the Claude model)"
sdpo_var JUDGE "claude" "Pairwise style judge: rule, local, claude or vllm"
sdpo_var JUDGE_MODEL "" "Judge model (local / vllm; a claude-* id picks the Claude model)" "(USER_MODEL)"
sdpo_var STYLE "no_emojis" "Target user style profile"
sdpo_var EVAL_STYLES "" "Additional styles to evaluate on"
sdpo_var LR "5e-6" "Learning rate"
sdpo_var LOSS_MODE "full_distillation" "Loss function variant"
sdpo_var TRAIN_N "15" "Number of training examples"
sdpo_var EVAL_N "100" "Number of evaluation examples"
sdpo_var EVAL_EVERY "3" "Evaluate every N training steps"
sdpo_var TRAIN_STEPS_PER_EXAMPLE "1" "Gradient steps per example"
sdpo_var SEED "1234" "Random seed"
sdpo_var DATA_DIR "data/helpsteer_prompts" "Directory containing train.jsonl and validation.jsonl"
sdpo_var BASELINE_MODEL "" "Baseline for comparison" "(the initial model)"
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/online_$(sdpo_slug "$MODEL")_${STYLE}_$(sdpo_run_tag)" \
    "Checkpoints, metrics and results" "\$BASE_WORK/sdpo_outputs/online_<model>_<style>_<job id or time>"
sdpo_help_or_continue "Online SDPO: learn a user's style from simulated interactions, judged against a baseline."

sdpo_check_choice USER_SIMULATOR rule local claude vllm
sdpo_check_choice JUDGE rule local claude vllm
sdpo_check_number LR
for count in TRAIN_N EVAL_N TRAIN_STEPS_PER_EXAMPLE; do sdpo_check_int "$count" 1; done
sdpo_check_int EVAL_EVERY 0
sdpo_check_int SEED 0
sdpo_check_api_key USER_SIMULATOR JUDGE
[[ -n $JUDGE_MODEL ]] || JUDGE_MODEL=$USER_MODEL
sdpo_input_path MODEL
sdpo_input_path USER_MODEL
sdpo_input_path JUDGE_MODEL
sdpo_input_path BASELINE_MODEL
sdpo_input_path DATA_DIR
sdpo_output_path OUTPUT_DIR
# shellcheck disable=SC2034  # read by name in sdpo_flag
TRAIN_JSONL=$DATA_DIR/train.jsonl VAL_JSONL=$DATA_DIR/validation.jsonl
sdpo_config_sets train_jsonl || sdpo_check_exists DATA_DIR file train.jsonl
sdpo_config_sets val_jsonl || sdpo_check_exists DATA_DIR file validation.jsonl

sdpo_python "$REPO_ROOT/eval_online_sdpo.py"
sdpo_flag --model MODEL
sdpo_flag --user_simulator USER_SIMULATOR
# A model name means something to a model-backed user or judge; for Claude only a claude-* id does.
names_a_model() { [[ $1 == local || $1 == vllm || ( $1 == claude && $2 == claude* ) ]]; }
names_a_model "$USER_SIMULATOR" "$USER_MODEL" && sdpo_flag --user_model_name_or_path USER_MODEL
sdpo_flag --judge JUDGE
names_a_model "$JUDGE" "$JUDGE_MODEL" && sdpo_flag --judge_model JUDGE_MODEL
sdpo_flag --style STYLE
sdpo_flag --eval_styles EVAL_STYLES
sdpo_flag --lr LR
sdpo_flag --loss_mode LOSS_MODE
sdpo_flag --train_n TRAIN_N
sdpo_flag --eval_n EVAL_N
sdpo_flag --eval_every EVAL_EVERY
sdpo_flag --train_steps_per_example TRAIN_STEPS_PER_EXAMPLE
sdpo_flag --seed SEED
# DATA_DIR stands for both files: set by the user, it wins over a --config YAML's paths too
if sdpo_user_set DATA_DIR; then _SDPO_USER_SET+="TRAIN_JSONL VAL_JSONL "; fi
sdpo_flag --train_jsonl TRAIN_JSONL
sdpo_flag --val_jsonl VAL_JSONL
sdpo_flag --baseline_model BASELINE_MODEL
sdpo_flag --output_dir OUTPUT_DIR
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
