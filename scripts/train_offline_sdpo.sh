#!/usr/bin/env bash
# Offline SDPO: train a policy on logged interactions (offline_sdpo/main_offline_sdpo.py).
#   TRAIN_JSONL=data/wildfeedback/wildfeedback_interactions.jsonl scripts/train_offline_sdpo.sh
#   WORLD_SIZE=1 TRAIN_JSONL=... scripts/train_offline_sdpo.sh --max_steps 10    # one process
# WORLD_SIZE defaults to the GPUs the machine shows (1 on a CPU laptop); > 1 runs `accelerate launch`; multi-node runs set NUM_MACHINES, MACHINE_RANK and
# MAIN_PROCESS_IP on every node (scripts/slurm/train_offline_sdpo.sbatch does that for SLURM).
# Only the variables you set become flags (the upstream spellings --base_model and --learning_rate,
# aliases of --model and --lr); the defaults are main_offline_sdpo.py's.
# `--help` lists every variable; `--dry-run` prints the command and runs nothing.
set -euo pipefail
# scripts/train_offline_sft.sh sources this file with OFFLINE_TRAINER=sft: one wrapper for both trainers.
[[ ${BASH_SOURCE[0]} != "$0" ]] || OFFLINE_TRAINER=sdpo
case ${OFFLINE_TRAINER:-sdpo} in
    sdpo) OFFLINE_ENTRY=main_offline_sdpo.py OFFLINE_PREFIX=offline OFFLINE_TITLE="Offline SDPO training" ;;
    sft) OFFLINE_ENTRY=main_offline_sft.py OFFLINE_PREFIX=offline_sft OFFLINE_TITLE="Offline SFT baseline (the follow-ups ignored)" ;;
    *) echo "error: OFFLINE_TRAINER=$OFFLINE_TRAINER: choose sdpo or sft" >&2; exit 2 ;;
esac
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sdpo_init "$@"

sdpo_field TRAIN_JSONL --train_jsonl "(required)"
sdpo_field BASE_MODEL --base_model
sdpo_field LR --learning_rate
sdpo_field BS --batch_size
sdpo_field GA --grad_accum
sdpo_field NUM_EPOCHS --num_epochs
sdpo_var WORLD_SIZE "$(sdpo_gpu_count)" "Processes (GPUs) in total over all machines; 1 runs plain python (the paper ran 4)" \
    "(the GPUs this machine shows, as counted by sdpo_gpu_count; 1 without a GPU)"
sdpo_var ACCELERATE_CONFIG "multigpu_accelerate_config.yaml" "Accelerate config (DDP; FSDP / DeepSpeed ones in offline_sdpo/configs/); its process count is overridden by WORLD_SIZE"
sdpo_var NUM_MACHINES "1" "Machines (nodes) of a multi-node run"
sdpo_var MACHINE_RANK "${SLURM_NODEID:-0}" "This machine's rank in a multi-node run" "\${SLURM_NODEID:-0}"
sdpo_var MAIN_PROCESS_IP "" "Address of rank 0 (required when NUM_MACHINES > 1)"
sdpo_var MAIN_PROCESS_PORT "29500" "Port on rank 0 for the process group"
model_slug=$(sdpo_effective BASE_MODEL model)
sdpo_config_var
sdpo_var OUTPUT_DIR "$BASE_WORK/sdpo_outputs/${OFFLINE_PREFIX}_${model_slug:+$(sdpo_slug "$model_slug")_}$(sdpo_run_tag)" \
    "Checkpoints, metrics.jsonl and the final model" "\$BASE_WORK/sdpo_outputs/${OFFLINE_PREFIX}_<model>_<job id or time>"
sdpo_help_or_continue "$OFFLINE_TITLE on logged (prompt, completion, user_response) interactions."

sdpo_config_sets train_jsonl || sdpo_require TRAIN_JSONL
sdpo_input_path TRAIN_JSONL
sdpo_input_path ACCELERATE_CONFIG
sdpo_output_path OUTPUT_DIR
[[ -z $TRAIN_JSONL ]] || sdpo_check_exists TRAIN_JSONL file
sdpo_check_number LR
sdpo_check_number NUM_EPOCHS
sdpo_check_int BS 1
sdpo_check_int GA 1
sdpo_check_int WORLD_SIZE 1
sdpo_check_int NUM_MACHINES 1
if (( NUM_MACHINES > 1 )); then
    sdpo_require MAIN_PROCESS_IP
    sdpo_check_int MACHINE_RANK 0
    sdpo_check_int MAIN_PROCESS_PORT 1
    (( MACHINE_RANK < NUM_MACHINES )) || sdpo_die "MACHINE_RANK=$MACHINE_RANK: must be below NUM_MACHINES=$NUM_MACHINES"
    (( WORLD_SIZE % NUM_MACHINES == 0 )) ||
        sdpo_die "WORLD_SIZE=$WORLD_SIZE: must be a multiple of NUM_MACHINES=$NUM_MACHINES (processes in total, the same on every machine)"
fi
if (( WORLD_SIZE > 1 )) && [[ -n $ACCELERATE_CONFIG ]]; then sdpo_check_exists ACCELERATE_CONFIG file; fi

sdpo_launcher "$REPO_ROOT/offline_sdpo/$OFFLINE_ENTRY"
sdpo_flag --train_jsonl TRAIN_JSONL
sdpo_flag --base_model BASE_MODEL
sdpo_flag --learning_rate LR
sdpo_flag --batch_size BS
sdpo_flag --grad_accum GA
sdpo_flag --num_epochs NUM_EPOCHS
sdpo_output_dir_flag
sdpo_exec "${SDPO_CMD[@]}" ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}
