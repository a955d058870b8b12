#!/usr/bin/env bash
# Benchmarks of checkpoints and a baseline through lm-evaluation-harness (IFEval, MMLU-Pro,
# TruthfulQA MC1, HellaSwag, CommonsenseQA) and alpaca_eval (AlpacaEval 2 LC win rate)
# (auxiliary/eval_benchmarks.py). Writes benchmarks.json and the harnesses' own files.
#   CHECKPOINTS="/runs/a/checkpoints/step_000015" BASELINE_MODEL=Qwen/Qwen3-8B scripts/eval_benchmarks.sh
#   ... TASKS=ifeval,alpaca_eval LIMIT=20 scripts/eval_benchmarks.sh --alpaca_annotator_base_url http://host:8000/v1
# `--help` lists every variable; `--dry-run` prints the command and runs nothing (the Python
# side's --dry_run prints the harness calls).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_var CHECKPOINTS "" "Space-separated checkpoint paths" "(none: the baseline only)"
sdpo_var BASELINE_MODEL "" "Baseline model path or hub id" "(required)"
sdpo_var TASKS "ifeval,mmlu_pro,truthfulqa_mc1,hellaswag,commonsense_qa,alpaca_eval" "Benchmarks to run"
sdpo_var LIMIT "" "First N items of every task (smoke runs)" "(all)"
sdpo_var BACKEND "hf" "lm_eval model backend: hf or vllm"
sdpo_var BASE_MODEL "" "Base model of LoRA adapter checkpoints" "(the one in adapter_config.json)"
sdpo_var IFEVAL_JSONL "" "Local IFEval prompts (hub format)" "(google/IFEval from the hub)"
sdpo_var ALPACA_EVAL_JSON "" "Local AlpacaEval set (instruction, output, generator, dataset)" "(tatsu-lab/alpaca_eval)"
sdpo_var ALPACA_ANNOTATOR "weighted_alpaca_eval_gpt4_turbo" "alpaca_eval annotator config (name or configs.yaml)"
sdpo_var NLTK_DATA "" "NLTK data folder for IFEval's checkers" "(NLTK's default search path)"
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/eval_benchmarks_$(sdpo_run_tag)" \
    "benchmarks.json, lm_eval/, alpaca_eval/" "\$BASE_WORK/sdpo_outputs/eval_benchmarks_<job id or time>"
sdpo_help_or_continue "Benchmark evaluation through lm-evaluation-harness and alpaca_eval."

sdpo_config_sets baseline_model || sdpo_require BASELINE_MODEL
sdpo_check_choice BACKEND hf vllm
[[ -z $LIMIT ]] || sdpo_check_int LIMIT 1
sdpo_input_paths CHECKPOINTS
sdpo_input_path BASELINE_MODEL
sdpo_input_path BASE_MODEL
sdpo_input_path IFEVAL_JSONL
sdpo_input_path ALPACA_EVAL_JSON
sdpo_input_path NLTK_DATA
sdpo_output_path OUTPUT_DIR
[[ -z $IFEVAL_JSONL ]] || sdpo_check_exists IFEVAL_JSONL file
[[ -z $ALPACA_EVAL_JSON ]] || sdpo_check_exists ALPACA_EVAL_JSON file

sdpo_python "$REPO_ROOT/auxiliary/eval_benchmarks.py"
sdpo_words_flag --checkpoints CHECKPOINTS
sdpo_flag --baseline_model BASELINE_MODEL
sdpo_flag --tasks TASKS
sdpo_flag --limit LIMIT
sdpo_flag --backend BACKEND
sdpo_flag --base_model BASE_MODEL
sdpo_flag --ifeval_jsonl IFEVAL_JSONL
sdpo_flag --alpaca_eval_json ALPACA_EVAL_JSON
sdpo_flag --alpaca_annotator ALPACA_ANNOTATOR
sdpo_flag --nltk_data NLTK_DATA
sdpo_flag --output_dir OUTPUT_DIR
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
