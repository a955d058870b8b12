#!/usr/bin/env bash
# Per-token SDPO signal under a relevant and an unrelated follow-up, with heatmaps
# (auxiliary/sdpo_signal_analysis.py). Writes sdpo_signals.json, unrelated.png, followup.png,
# stacked.png, side_by_side.png and case{N}_tokens.png into OUTPUT_DIR.
#   scripts/run_signal_analysis.sh
#   MODEL=smollm2-135m-instruct N_CASES=6 scripts/run_signal_analysis.sh --max_new_tokens 64
# Only the variables you set become flags; the defaults are sdpo_signal_analysis.py's.
# `--help` lists every variable; `--dry-run` prints the command and runs nothing.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_field MODEL --model
sdpo_field CASES_JSON --cases_json
sdpo_field N_CASES --n_cases
sdpo_config_var
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/signal_analysis_$(sdpo_run_tag)" \
    "Signals JSON and figures" "\$BASE_WORK/sdpo_outputs/signal_analysis_<job id or time>"
sdpo_help_or_continue "Per-token SDPO signal analysis: heatmaps under a relevant and an unrelated follow-up."

sdpo_input_path CASES_JSON
sdpo_output_path OUTPUT_DIR
[[ -z $CASES_JSON ]] || sdpo_check_exists CASES_JSON file
sdpo_check_int N_CASES 0

sdpo_python "$REPO_ROOT/auxiliary/sdpo_signal_analysis.py"
sdpo_flag --model MODEL
sdpo_flag --cases_json CASES_JSON
sdpo_flag --n_cases N_CASES
sdpo_output_dir_flag
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
