#!/usr/bin/env bash
# In-context oracle (auxiliary/eval_incontext_oracle.py): the model told the user's style in its
# system prompt, judged against the same model without it. No learning: the upper reference an
# interaction-trained model would approach. Writes results.json, completions.jsonl, winrate.png.
#   scripts/eval_incontext_oracle.sh
#   MODEL=Qwen/Qwen3-4B JUDGE=claude EVAL_STYLES="no_emojis concise_casual_beginner" scripts/eval_incontext_oracle.sh
# Only the variables you set become flags; the defaults are eval_incontext_oracle.py's, changed by
# configs/wrappers/eval_incontext_oracle.yaml (passed as --config first).
# `--help` lists every variable; `--dry-run` prints the command and runs nothing.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_profile configs/wrappers/eval_incontext_oracle.yaml
sdpo_field MODEL --model
sdpo_field JUDGE_MODEL --judge_model
sdpo_field JUDGE --judge
sdpo_field EVAL_STYLES --eval_styles
sdpo_field EVAL_N --eval_n
sdpo_field DATA_DIR --data_dir
sdpo_config_var
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/incontext_oracle_$(sdpo_run_tag)" \
    "results.json, completions.jsonl, winrate.png" "\$BASE_WORK/sdpo_outputs/incontext_oracle_<job id or time>"
sdpo_help_or_continue "In-context oracle: the style given in the system prompt, judged against no instruction."

sdpo_check_choice JUDGE rule local claude vllm
sdpo_check_int EVAL_N 1
sdpo_check_api_key JUDGE:judge
sdpo_input_path MODEL
sdpo_input_path DATA_DIR
sdpo_output_path OUTPUT_DIR
[[ -z $DATA_DIR ]] || sdpo_config_sets val_jsonl || sdpo_check_exists DATA_DIR file validation.jsonl

sdpo_python "$REPO_ROOT/auxiliary/eval_incontext_oracle.py"
sdpo_flag --model MODEL
sdpo_flag --judge JUDGE
sdpo_flag --judge_model JUDGE_MODEL
sdpo_words_flag --eval_styles EVAL_STYLES
sdpo_flag --eval_n EVAL_N
sdpo_flag --data_dir DATA_DIR
sdpo_output_dir_flag
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
