#!/usr/bin/env bash
# Benchmarks of checkpoints and a baseline through lm-evaluation-harness (IFEval, MMLU-Pro,
# TruthfulQA MC1, HellaSwag, CommonsenseQA) and alpaca_eval (AlpacaEval 2 LC win rate)
# (auxiliary/eval_benchmarks.py). Writes benchmarks.json and the harnesses' own files.
#   CHECKPOINTS="/runs/a/checkpoints/step_000015" BASELINE_MODEL=Qwen/Qwen3-8B scripts/eval_benchmarks.sh
#   ... TASKS=ifeval,alpaca_eval LIMIT=20 scripts/eval_benchmarks.sh --alpaca_annotator_base_url http://host:8000/v1
# Only the variables you set become flags; the defaults are BenchmarkArgs' (auxiliary/evals/benchmarks.py).
# `--help` lists every variable; `--dry-run` prints the command and runs nothing (the Python
# side's --dry_run prints the harness calls).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_field CHECKPOINTS --checkpoints "(none: the baseline only)"
sdpo_field BASELINE_MODEL --baseline_model "(required)"
sdpo_field TASKS --tasks
sdpo_field LIMIT --limit "(all)"
sdpo_field BACKEND --backend
sdpo_field BASE_MODEL --base_model
sdpo_field IFEVAL_JSONL --ifeval_jsonl "(google/IFEval from the hub)"
sdpo_field ALPACA_EVAL_JSON --alpaca_eval_json "(tatsu-lab/alpaca_eval from the hub)"
sdpo_field ALPACA_ANNOTATOR --alpaca_annotator
sdpo_field NLTK_DATA --nltk_data "(NLTK's default search path)"
sdpo_config_var
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/eval_benchmarks_$(sdpo_run_tag)" \
    "benchmarks.json, lm_eval/, alpaca_eval/" "\$BASE_WORK/sdpo_outputs/eval_benchmarks_<job id or time>"
sdpo_help_or_continue "Benchmark evaluation through lm-evaluation-harness and alpaca_eval (docs/benchmarks.md)."

sdpo_config_sets baseline_model || sdpo_require BASELINE_MODEL
sdpo_check_choice BACKEND hf vllm
sdpo_check_int LIMIT 1
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
sdpo_output_dir_flag
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
