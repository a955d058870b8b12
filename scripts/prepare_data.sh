#!/usr/bin/env bash
# Prepare the data sets: runs the four preprocessors (auxiliary/preprocess_*.py) into data/.
#   scripts/prepare_data.sh                                   # all four, from the HF hub
#   DATASETS=helpsteer HELPSTEER_SOURCE=/data/HelpSteer2 scripts/prepare_data.sh   # a local copy
# Extra arguments go to every selected preprocessor, so pick one with DATASETS for its own flags:
#   DATASETS=wildchat scripts/prepare_data.sh --max_interactions 5000
# `--help` lists every variable; `--dry-run` prints the commands and runs nothing.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_var DATASETS "helpsteer tldr wildfeedback wildchat" "Which preprocessors run (space-separated, in this order)"
sdpo_var DATA_ROOT "$REPO_ROOT/data" "Parent folder of the outputs" "(data/ in the repo)"
sdpo_var HELPSTEER_SOURCE "nvidia/HelpSteer2" "HelpSteer2: hub name or local file/folder -> DATA_ROOT/helpsteer_prompts/{train,validation}.jsonl"
sdpo_var TLDR_SOURCE "openai/summarize_from_feedback" "TL;DR: hub name or local file/folder -> DATA_ROOT/tldr_prompts_unique/{train,validation}.jsonl"
sdpo_var WILDFEEDBACK_SOURCE "microsoft/WildFeedback" "WildFeedback: hub name or local file/folder -> DATA_ROOT/wildfeedback/wildfeedback_interactions.jsonl"
sdpo_var WILDCHAT_SOURCE "allenai/WildChat" "WildChat: hub name or local file/folder -> DATA_ROOT/wildchat/wildchat_interactions_v1.jsonl"
sdpo_help_or_continue "Download (or read local copies of) the four data sets and write the JSONL files the runs read."

sdpo_output_path DATA_ROOT
read -r -a selected <<<"$DATASETS"
[[ ${#selected[@]} -gt 0 ]] || sdpo_die "DATASETS is empty: name at least one of helpsteer tldr wildfeedback wildchat"
# Check every name first: a typo must not stop the job after an hour of downloading.
for dataset in "${selected[@]}"; do
    case "$dataset" in
        helpsteer | tldr | wildfeedback | wildchat) ;;
        *) sdpo_die "DATASETS: unknown data set '$dataset'; choose from: helpsteer tldr wildfeedback wildchat" ;;
    esac
done
for dataset in "${selected[@]}"; do
    case "$dataset" in
        helpsteer) script=preprocess_helpsteer.py source_var=HELPSTEER_SOURCE out=helpsteer_prompts ;;
        tldr) script=preprocess_tldr_dataset.py source_var=TLDR_SOURCE out=tldr_prompts_unique ;;
        wildfeedback) script=preprocess_wildfeedback.py source_var=WILDFEEDBACK_SOURCE out=wildfeedback ;;
        wildchat) script=preprocess_wildchat.py source_var=WILDCHAT_SOURCE out=wildchat ;;
    esac
    sdpo_input_path "$source_var"  # a local copy given relative to here or to the repo root
    sdpo_python "$REPO_ROOT/auxiliary/$script"
    SDPO_CMD+=(--dataset "${!source_var}" --out_dir "$DATA_ROOT/$out")
    sdpo_run "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
done
