#!/usr/bin/env bash
# Online SDPO (eval_online_sdpo.py): for each training prompt the policy answers, a simulated user
# replies in its style, and the SDPO signal updates the policy at once; every EVAL_EVERY steps
# (and at the start and the end) a judge compares the policy with the baseline on held-out prompts.
#   scripts/eval_online_sdpo.sh                                   # HelpSteer2, Claude user + judge (configs/wrappers/eval_online_sdpo.yaml)
#   USER_SIMULATOR=local JUDGE=local USER_MODEL=Qwen/Qwen3-8B STYLE=concise_casual_beginner \
#       DATA_DIR=data/tldr_prompts_unique scripts/eval_online_sdpo.sh
#   USER_SIMULATOR=rule JUDGE=rule MODEL=smollm2-135m-instruct DATA_DIR=data/samples \
#       scripts/eval_online_sdpo.sh                               # free, CPU, no download
#   WORLD_SIZE=4 INTERACTIONS_PER_UPDATE=8 scripts/eval_online_sdpo.sh  # accelerate launch, 4 processes (DDP)
# Only the variables you set become flags; the defaults are eval_online_sdpo.py's, changed by the
# profile configs/wrappers/eval_online_sdpo.yaml (passed as --config first).
# `--help` lists every variable; `--dry-run` prints the command and runs nothing.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_profile configs/wrappers/eval_online_sdpo.yaml
sdpo_field MODEL --model
sdpo_field USER_SIMULATOR --user_simulator
sdpo_field USER_MODEL --user_model_name_or_path
sdpo_field JUDGE --judge
sdpo_field JUDGE_MODEL --judge_model "(USER_MODEL when set)"
sdpo_field STYLE --style
sdpo_field EVAL_STYLES --eval_styles
sdpo_field LR --lr
sdpo_field LOSS_MODE --loss_mode
sdpo_field TRAIN_N --train_n
sdpo_field EVAL_N --eval_n
sdpo_field EVAL_EVERY --eval_every
sdpo_field TRAIN_STEPS_PER_EXAMPLE --train_steps_per_example
sdpo_field INTERACTIONS_PER_UPDATE --interactions_per_update
sdpo_field SEED --seed
sdpo_field DATA_DIR --train_jsonl --val_jsonl
sdpo_field BASELINE_MODEL --baseline_model
model_slug=$(sdpo_effective MODEL model)
style_slug=$(sdpo_effective STYLE style)
sdpo_config_var
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/online_${model_slug:+$(sdpo_slug "$model_slug")_}${style_slug:+${style_slug}_}$(sdpo_run_tag)" \
    "Checkpoints, metrics and results" "\$BASE_WORK/sdpo_outputs/online_<model>_<style>_<job id or time>"
sdpo_var WORLD_SIZE "1" "Processes (GPUs); > 1 runs accelerate launch (DDP; INTERACTIONS_PER_UPDATE a multiple of it)"
sdpo_help_or_continue "Online SDPO: learn a user's style from simulated interactions, judged against a baseline."

sdpo_check_choice USER_SIMULATOR rule local claude vllm
sdpo_check_choice JUDGE rule local claude vllm
sdpo_check_number LR
for count in TRAIN_N EVAL_N TRAIN_STEPS_PER_EXAMPLE; do sdpo_check_int "$count" 1; done
sdpo_check_int EVAL_EVERY 0
sdpo_check_int WORLD_SIZE 1
sdpo_check_int INTERACTIONS_PER_UPDATE 1
sdpo_check_int SEED 0
sdpo_check_api_key USER_SIMULATOR:user_simulator JUDGE:judge
[[ -n $JUDGE_MODEL ]] || JUDGE_MODEL=$USER_MODEL
sdpo_input_path MODEL
sdpo_input_path USER_MODEL
sdpo_input_path JUDGE_MODEL
sdpo_input_path BASELINE_MODEL
sdpo_input_path DATA_DIR
sdpo_output_path OUTPUT_DIR
TRAIN_JSONL="" VAL_JSONL=""
if [[ -n $DATA_DIR ]]; then  # DATA_DIR stands for both files
    # shellcheck disable=SC2034  # read by name in sdpo_flag
    TRAIN_JSONL=$DATA_DIR/train.jsonl VAL_JSONL=$DATA_DIR/validation.jsonl
    sdpo_check_exists DATA_DIR file train.jsonl
    sdpo_check_exists DATA_DIR file validation.jsonl
fi

sdpo_launcher "$REPO_ROOT/eval_online_sdpo.py"
sdpo_flag --model MODEL
sdpo_flag --user_simulator USER_SIMULATOR
# A model name means something to a model-backed user or judge; for Claude only a claude-* id does.
names_a_model() { [[ $1 == local || $1 == vllm || ( $1 == claude && $2 == claude* ) ]]; }
names_a_model "$(sdpo_effective USER_SIMULATOR user_simulator)" "$USER_MODEL" && sdpo_flag --user_model_name_or_path USER_MODEL
sdpo_flag --judge JUDGE
names_a_model "$(sdpo_effective JUDGE judge)" "$JUDGE_MODEL" && sdpo_flag --judge_model JUDGE_MODEL
sdpo_flag --style STYLE
sdpo_flag --eval_styles EVAL_STYLES
sdpo_flag --lr LR
sdpo_flag --loss_mode LOSS_MODE
sdpo_flag --train_n TRAIN_N
sdpo_flag --eval_n EVAL_N
sdpo_flag --eval_every EVAL_EVERY
sdpo_flag --train_steps_per_example TRAIN_STEPS_PER_EXAMPLE
sdpo_flag --interactions_per_update INTERACTIONS_PER_UPDATE
sdpo_flag --seed SEED
sdpo_flag --train_jsonl TRAIN_JSONL
sdpo_flag --val_jsonl VAL_JSONL
sdpo_flag --baseline_model BASELINE_MODEL
sdpo_output_dir_flag
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
