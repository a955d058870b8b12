# shellcheck shell=bash
# Shared by every wrapper in scripts/ and scripts/slurm/ (sourced, never run on its own).
#
# The contract every wrapper follows:
#   - a setting of the Python entry point is an env var mapped to its flag (`sdpo_field`); the
#     wrapper passes the flag only when the user set the variable, so the default lives once, in
#     the dataclass (or in the wrapper's committed YAML profile under configs/wrappers/, passed as
#     `--config` first, where the wrapper must differ from Python);
#   - settings of the wrapper itself (launcher, folders) are env vars with a default (`sdpo_var`);
#   - `--help` prints the table generated from the dataclass metadata (auxiliary/runtime/env_vars.py,
#     also docs/env_vars.md);
#   - `.env` in the repo root is sourced when present; variables already in the environment win
#     over it (so `MODEL=x scripts/eval_online_sdpo.sh` beats a MODEL line in .env);
#   - BASE_WORK=${SCRATCH:-${TMPDIR:-/tmp}}; OUTPUT_DIR and CACHE_DIR fall back from it, and the
#     HF / torch / triton / vLLM caches go inside CACHE_DIR unless the user set them;
#   - `--list-vars` prints the declarations (tab-separated) that the generator reads;
#   - `--dry-run` prints the fully resolved command(s), one per line, ready to paste, and
#     creates, writes or downloads nothing; secrets never appear in anything printed;
#   - every other argument reaches the Python entry point unchanged ("$@", quoting intact);
#     `--` ends the wrapper's own options (everything after it is passed on, even --dry-run).
#
# Kept to bash 3.2 features (no associative arrays, namerefs or `declare -g`) so that a dry run
# also works on a laptop's old bash.

SDPO_SECRET_NAMES="ANTHROPIC_API_KEY HF_TOKEN WANDB_API_KEY"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SDPO_DRY_RUN=0
SDPO_HELP=0
SDPO_LIST_VARS=0      # --list-vars: print the variable declarations for auxiliary/runtime/env_vars.py
SDPO_PROFILE=""       # the wrapper's YAML profile (configs/wrappers/<name>.yaml), when it has one
SDPO_ARGS=()          # arguments for the Python entry point
SDPO_CMD=()           # the command being assembled by sdpo_launcher / sdpo_flag
SDPO_EXPORTS=()       # names of the variables this library exported (shown in printed commands)
_SDPO_NAMES=()        # registered names and their meanings (parallel arrays, for error messages)
_SDPO_MEANINGS=()
_SDPO_YAML_KEYS=" "   # top-level keys of a --config YAML among the arguments
_SDPO_USER_CONFIG=""  # the last --config YAML among the arguments
_SDPO_DECLARATIONS=() # tab-separated lines for --list-vars
_SDPO_DEFAULTED=" "   # sdpo_var names that took the wrapper's default (the user set nothing)

# --------------------------------------------------------------------------- messages

sdpo_die() {
    printf 'error: %s\n' "$(sdpo_mask "$*")" >&2
    exit 2
}

sdpo_note() {
    printf '%s: %s\n' "$(basename "$0")" "$(sdpo_mask "$*")" >&2
}

# --------------------------------------------------------------------------- secrets

# True when a variable name looks like it holds a secret (any case: hf_token counts too).
sdpo_is_secret_name() {
    case " $SDPO_SECRET_NAMES " in *" $1 "*) return 0 ;; esac
    _sdpo_matches_nocase "$1" '*_KEY' '*_TOKEN' '*_SECRET' '*PASSWORD'
}

# _sdpo_matches_nocase TEXT PATTERN...: case-insensitive glob match without forking `tr`.
_sdpo_matches_nocase() {
    local text=$1 pattern rc=1 was_set=0
    shift
    shopt -q nocasematch && was_set=1
    shopt -s nocasematch
    for pattern in "$@"; do
        # shellcheck disable=SC2053  # the right side is a glob on purpose
        [[ $text == $pattern ]] && { rc=0; break; }
    done
    [[ $was_set == 1 ]] || shopt -u nocasematch
    return $rc
}

# Print $1 with every secret value from the environment (or .env) replaced by a reference to
# its variable ("$ANTHROPIC_API_KEY"), so a printed command stays paste-ready and leaks nothing.
sdpo_mask() {
    local text=$1 name value quoted
    for name in $(compgen -v); do
        sdpo_is_secret_name "$name" || continue
        value=${!name-}
        [[ ${#value} -ge 4 ]] || continue  # masking a 1-3 character "secret" would garble everything
        printf -v quoted '%q' "$value"
        text=${text//"$quoted"/\"\$$name\"}
        text=${text//"$value"/\"\$$name\"}
    done
    printf '%s' "$text"
}

# True for flags whose value is a credential (--api_key, --hf-token, --db_password=...).
_sdpo_is_secret_flag() {
    local flag=${1%%=*}
    _sdpo_matches_nocase "${flag//-/_}" '__*KEY' '__*TOKEN' '__*SECRET' '__*PASSWORD'
}

# One shell-quoted line for a command, with the variables this library exported as a prefix and
# secrets masked (both by value and as the argument of a credential flag).
sdpo_render() {
    local line="" name arg quoted hide_next=0
    for name in ${SDPO_EXPORTS[@]+"${SDPO_EXPORTS[@]}"}; do
        printf -v quoted '%q' "${!name}"
        line+="$name=$quoted "
    done
    for arg in "$@"; do
        printf -v quoted '%q' "$arg"
        if [[ $hide_next == 1 ]]; then
            quoted="'***'"
            hide_next=0
        elif [[ $arg == --* ]] && _sdpo_is_secret_flag "$arg"; then
            if [[ $arg == *=* ]]; then
                printf -v quoted '%q' "${arg%%=*}"
                quoted+="='***'"
            else
                hide_next=1
            fi
        fi
        line+="$quoted "
    done
    sdpo_mask "${line% }"
}

# --------------------------------------------------------------------------- setup

# Parse the wrapper's own options, source .env, set the work/cache folders and the interpreter.
sdpo_init() {
    sdpo_init_light "$@"
    _sdpo_common_vars
    _sdpo_read_config_keys
}

# Only the options and .env: for the SLURM templates, which hand everything else to a wrapper.
sdpo_init_light() {
    local arg passthrough=0
    for arg in "$@"; do
        if [[ $passthrough == 1 ]]; then
            SDPO_ARGS+=("$arg")
            continue
        fi
        case "$arg" in
            --dry-run) SDPO_DRY_RUN=1 ;;
            -h | --help) SDPO_HELP=1 ;;
            --list-vars) SDPO_LIST_VARS=1 ;;
            --) passthrough=1 ;;
            *) SDPO_ARGS+=("$arg") ;;
        esac
    done
    _sdpo_source_env_file
}

_sdpo_source_env_file() {
    local env_file default_file="$REPO_ROOT/.env"
    env_file=${SDPO_ENV_FILE-$default_file}
    [[ -n $env_file ]] || return 0  # SDPO_ENV_FILE= (empty) switches .env off
    if [[ ! -f $env_file ]]; then
        [[ $env_file == "$default_file" ]] && return 0
        sdpo_die "SDPO_ENV_FILE=$env_file: no such file"
    fi
    # Remember the environment, source the file (exporting what it sets), then put back every
    # variable the environment already had: values given on the command line win over .env.
    local saved_names=() saved_values=() name i
    for name in $(compgen -e); do
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        saved_names+=("$name")
        saved_values+=("${!name}")
    done
    set +u -a
    # shellcheck disable=SC1090  # the file is the user's
    if ! source "$env_file"; then
        set -u +a
        sdpo_die "$env_file: could not be sourced (it must be shell syntax: NAME=value lines)"
    fi
    set -u +a
    for i in "${!saved_names[@]}"; do
        name=${saved_names[$i]}
        if [[ ${!name-} != "${saved_values[$i]}" ]]; then
            printf -v "$name" '%s' "${saved_values[$i]}" 2>/dev/null || true
            export "${name?}"
        fi
    done
    [[ $SDPO_DRY_RUN == 1 ]] && sdpo_note "settings read from $env_file"
    return 0
}

_sdpo_common_vars() {
    sdpo_var BASE_WORK "${SCRATCH:-${TMPDIR:-/tmp}}" \
        "Root of outputs and caches (never \$HOME)" "\${SCRATCH:-\${TMPDIR:-/tmp}}" common
    sdpo_output_path BASE_WORK
    sdpo_var CACHE_DIR "$BASE_WORK/sdpo_cache" \
        "Model/data caches: HF_HOME, TORCH_HOME, TRITON_CACHE_DIR, VLLM_CACHE_ROOT go inside it unless set" \
        "\$BASE_WORK/sdpo_cache" common
    sdpo_output_path CACHE_DIR
    sdpo_var SDPO_PYTHON "$(_sdpo_default_python)" "Python interpreter" "(.venv/bin/python if present, else python3)" common
    sdpo_var SDPO_ENV_FILE "" "Settings file sourced first (set it empty for none)" "(.env in the repo root)" common
    sdpo_var SDPO_RUN_TAG "" "Suffix of default OUTPUT_DIR names" "(job<SLURM_JOB_ID>, else the time)" common
    sdpo_var HF_TOKEN "" "Hugging Face token for gated models (never printed)" "" common
    sdpo_var ANTHROPIC_API_KEY "" "Claude user simulator / judge (never printed)" "" common
    sdpo_var WANDB_API_KEY "" "Weights & Biases, when a run reports there (never printed)" "" common

    # Caches inside CACHE_DIR only where the user chose nothing. A token saved by
    # `huggingface-cli login` stays usable when HF_HOME moves.
    local old_token="${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/huggingface/token"
    if [[ -z ${HF_HOME:-} && -z ${HF_TOKEN_PATH:-} && -f $old_token ]]; then
        sdpo_export HF_TOKEN_PATH "$old_token"
    fi
    [[ -n ${HF_HOME:-} ]] || sdpo_export HF_HOME "$CACHE_DIR/huggingface"
    [[ -n ${TORCH_HOME:-} ]] || sdpo_export TORCH_HOME "$CACHE_DIR/torch"
    [[ -n ${TRITON_CACHE_DIR:-} ]] || sdpo_export TRITON_CACHE_DIR "$CACHE_DIR/triton"
    [[ -n ${VLLM_CACHE_ROOT:-} ]] || sdpo_export VLLM_CACHE_ROOT "$CACHE_DIR/vllm"
    # The repo root on the path: the entry points import each other with any interpreter.
    sdpo_export PYTHONPATH "$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

_sdpo_default_python() {
    if [[ -x $REPO_ROOT/.venv/bin/python ]]; then printf '%s' "$REPO_ROOT/.venv/bin/python"; else printf python3; fi
}

sdpo_export() {
    printf -v "$1" '%s' "$2"
    export "${1?}"
    SDPO_EXPORTS+=("$1")
}

# Top-level keys of the YAML given as `--config FILE`: the wrapper leaves those settings to the
# file unless the user set the env var (precedence: flags > env vars you set > YAML > defaults).
# CONFIG=FILE (the environment or .env) counts like a --config before the arguments' own.
_sdpo_read_config_keys() {
    local arg config="" take_next=0 key preset=${CONFIG:-} file
    [[ -z $preset || $preset == /* || -e $preset ]] || preset="$REPO_ROOT/${preset#./}"
    for arg in ${SDPO_ARGS[@]+"${SDPO_ARGS[@]}"}; do
        if [[ $take_next == 1 ]]; then config=$arg; take_next=0; continue; fi
        case "$arg" in
            --config) take_next=1 ;;
            --config=*) config=${arg#--config=} ;;
        esac
    done
    for file in "$preset" "$config"; do
        [[ -n $file && -r $file ]] || continue
        _SDPO_USER_CONFIG=$file
        while IFS= read -r key; do
            _SDPO_YAML_KEYS+="$key "
        done < <(sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)[[:space:]]*:.*/\1/p' "$file")
    done
}

# --------------------------------------------------------------------------- variables

# sdpo_var NAME DEFAULT MEANING [SHOWN_DEFAULT] [common]
# A setting of the wrapper itself (not of the entry point): NAME keeps its value when set
# (environment or .env), else takes DEFAULT. --help lists it (prose defaults in parentheses).
sdpo_var() {
    local name=$1 default=$2 meaning=$3 shown=${4-$2} scope=${5-}
    if [[ -z ${!name:-} ]]; then
        printf -v "$name" '%s' "$default"
        _SDPO_DEFAULTED+="$name "
    fi
    _SDPO_NAMES+=("$name")
    _SDPO_MEANINGS+=("$meaning")
    _SDPO_DECLARATIONS+=("$(printf 'var\t%s\t%s\t%s\t%s' "$name" "${shown:-(empty)}" "$meaning" "${scope:-own}")")
}

# sdpo_field NAME --flag... [SHOWN_DEFAULT]: NAME stands for the entry point's --flag(s). No default
# here: the variable is empty unless the user set it, and `sdpo_flag` then passes nothing, so the
# dataclass (or the profile) decides. SHOWN_DEFAULT replaces the generated default in --help when
# the wrapper derives one (JUDGE_MODEL follows USER_MODEL).
sdpo_field() {
    local name=$1 flags=() shown=""
    shift
    while [[ $# -gt 0 ]]; do
        if [[ $1 == --* ]]; then flags+=("$1"); else shown=$1; fi
        shift
    done
    [[ -n ${!name:-} ]] || printf -v "$name" '%s' ""
    _SDPO_NAMES+=("$name")
    _SDPO_MEANINGS+=("the entry point's ${flags[*]}")
    _SDPO_DECLARATIONS+=("$(printf 'field\t%s\t%s\t%s' "$name" "${flags[*]}" "$shown")")
}

# sdpo_config_var: CONFIG=FILE, a YAML config (a preset of configs/paper/) for wrappers whose entry
# point reads --config; passed after the profile, before the flags from env vars and the arguments.
sdpo_config_var() {
    sdpo_var CONFIG "" "YAML config passed as --config after the wrapper's profile (e.g. a preset of configs/paper/); env vars you set and flags still win" "(none)"
}

# Processes for WORLD_SIZE when unset: the GPUs this machine shows (CUDA_VISIBLE_DEVICES when set,
# else nvidia-smi -L), 1 without any, so a CPU laptop runs plain python.
sdpo_gpu_count() {
    local count=0
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # set and empty: no GPU
        local ids=()
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        count=${#ids[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    (( count >= 1 )) || count=1
    printf '%s' "$count"
}

# sdpo_profile FILE: the wrapper's committed YAML profile (relative to the repo root); sdpo_python
# and sdpo_launcher pass it as the first --config, so the user's --config and flags override it.
sdpo_profile() {
    SDPO_PROFILE="$REPO_ROOT/$1"
    _SDPO_DECLARATIONS+=("$(printf 'profile\t%s' "$1")")
}

# _sdpo_yaml_value FILE KEY: the scalar of a top-level `key: value` line (quotes removed).
_sdpo_yaml_value() {
    [[ -n $1 && -r $1 ]] || return 0
    sed -n "s/^$2[[:space:]]*:[[:space:]]*//p" "$1" | tail -n 1 | sed -e 's/[[:space:]]*#.*$//' -e "s/^[\"']//" -e "s/[\"']\$//"
}

# sdpo_effective NAME KEY: what the entry point will use for KEY, as far as the wrapper can tell:
# the variable when set, else the user's --config, else the profile (else empty: the dataclass default).
sdpo_effective() {
    local value=${!1:-}
    [[ -n $value ]] || value=$(_sdpo_yaml_value "$_SDPO_USER_CONFIG" "$2")
    [[ -n $value ]] || value=$(_sdpo_yaml_value "$SDPO_PROFILE" "$2")
    printf '%s' "$value"
}

# True when the --config YAML among the arguments sets KEY.
sdpo_config_sets() { [[ $_SDPO_YAML_KEYS == *" $1 "* ]]; }

_sdpo_meaning() {
    local i
    for i in "${!_SDPO_NAMES[@]}"; do
        [[ ${_SDPO_NAMES[$i]} == "$1" ]] && { printf '%s' "${_SDPO_MEANINGS[$i]}"; return; }
    done
}

# --help: print the variable tables (generated from the dataclass metadata by
# auxiliary/runtime/env_vars.py, which reads this wrapper's declarations through --list-vars) and
# exit; --list-vars: print those declarations. Call after the last sdpo_var / sdpo_field.
sdpo_help_or_continue() {
    local line
    if [[ $SDPO_LIST_VARS == 1 ]]; then
        printf 'description\t%s\n' "$1"
        for line in ${_SDPO_DECLARATIONS[@]+"${_SDPO_DECLARATIONS[@]}"}; do printf '%s\n' "$line"; done
        exit 0
    fi
    [[ $SDPO_HELP == 1 ]] || return 0
    local script=$0
    [[ $script == /* ]] || script="$PWD/$script"
    printf 'Usage: [VAR=value ...] %s [--dry-run] [--help] [--] [flags passed to Python ...]\n\n' "$0"
    PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "${SDPO_PYTHON:-$(_sdpo_default_python)}" \
        -m auxiliary.runtime.env_vars --help-for "$script" ||
        sdpo_die "could not generate the variable table (auxiliary/runtime/env_vars.py)"
    exit 0
}

# --------------------------------------------------------------------------- checks

sdpo_require() {
    local name
    for name in "$@"; do
        [[ -n ${!name:-} ]] || sdpo_die "$name is required but not set ($(_sdpo_meaning "$name")). Example: $name=... $0"
    done
}

sdpo_check_int() {  # NAME MIN (an empty NAME is not set: nothing to check)
    local name=$1 min=$2
    [[ -n ${!name:-} ]] || return 0
    [[ ${!name} =~ ^[0-9]+$ ]] || sdpo_die "$name=${!name}: expected a whole number"
    (( 10#${!name} >= min )) || sdpo_die "$name=${!name}: must be >= $min"
}

sdpo_check_number() {  # NAME (a positive decimal such as 5e-6 or 0.001; empty: not set)
    [[ -n ${!1:-} ]] || return 0
    [[ ${!1} =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] || sdpo_die "$1=${!1}: expected a number such as 5e-6"
}

sdpo_check_choice() {  # NAME CHOICE... (empty: not set)
    local name=$1 choice
    shift
    [[ -n ${!name:-} ]] || return 0
    for choice in "$@"; do [[ ${!name} == "$choice" ]] && return 0; done
    sdpo_die "$name=${!name}: choose one of: $*"
}

# A missing input stops a real run before anything starts; a dry run only warns (it may be
# prepared on a machine that cannot see the data).
sdpo_check_exists() {  # NAME [file|dir] [PATH INSIDE NAME]
    local name=$1 kind=${2:-file} path=${!1}${3:+/$3} hint=""
    if [[ $kind == dir && -d $path ]] || [[ $kind == file && -f $path ]]; then return 0; fi
    [[ $name == DATA_DIR ]] && hint=" (scripts/prepare_data.sh writes the data sets; DATA_DIR=data/samples has a few bundled prompts)"
    [[ $name == TRAIN_JSONL ]] && hint=" (scripts/prepare_data.sh writes WildFeedback's and WildChat's interactions; TRAIN_JSONL=data/samples/interactions.jsonl has 24 bundled ones)"
    if [[ $SDPO_DRY_RUN == 1 ]]; then
        sdpo_note "warning: $name: $path not found$hint; a real run stops here"
    else
        sdpo_die "$name: $path not found$hint"
    fi
}

# sdpo_check_api_key NAME:KEY...: a setting that is effectively "claude" (sdpo_effective) needs
# ANTHROPIC_API_KEY. A real run stops before starting; a dry run warns.
sdpo_check_api_key() {
    local spec name
    for spec in "$@"; do
        name=${spec%%:*}
        [[ $(sdpo_effective "$name" "${spec#*:}") == claude && -z ${ANTHROPIC_API_KEY:-} ]] || continue
        if [[ $SDPO_DRY_RUN == 1 ]]; then
            sdpo_note "warning: $name=claude needs ANTHROPIC_API_KEY (a real run stops here)"
        else
            sdpo_die "$name=claude needs ANTHROPIC_API_KEY: set it in the environment or in .env, or choose another $name"
        fi
    done
}

# Input paths: taken from the current folder when they exist there, else from the repo root
# (so the defaults work from anywhere); made absolute so every node and a pasted command agree.
sdpo_input_path() {
    local name=$1 value=${!1}
    [[ -n $value && $value != /* ]] || return 0
    value=${value#./}
    if [[ -e $value ]]; then
        value="$PWD/$value"
    elif [[ -e $REPO_ROOT/$value ]]; then
        value="$REPO_ROOT/$value"
    fi
    printf -v "$name" '%s' "$value"
}

# Output paths: relative ones are taken from the current folder, made absolute.
sdpo_output_path() {
    local name=$1 value=${!1}
    [[ -n $value && $value != /* ]] || return 0
    printf -v "$name" '%s' "$PWD/${value#./}"
}

# Run tag for default output folders: SDPO_RUN_TAG, else the SLURM job (identical on every node,
# kept when a job is requeued, so the run can resume), else the current time.
sdpo_run_tag() {
    if [[ -n ${SDPO_RUN_TAG:-} ]]; then
        printf '%s' "$SDPO_RUN_TAG"
    elif [[ -n ${SLURM_JOB_ID:-} ]]; then
        printf 'job%s%s' "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}" "${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
    else
        date +%Y%m%d_%H%M%S
    fi
}

# A model id or path as a short folder-name piece: Qwen/Qwen3-8B -> Qwen3-8B.
sdpo_slug() {
    local value=${1%/}
    value=${value##*/}
    printf '%s' "${value//[^A-Za-z0-9._-]/_}"
}

# --------------------------------------------------------------------------- commands

# SDPO_CMD=( python SCRIPT ): single-process entry points (WORLD_SIZE, which .env may set for the
# offline trainer, does not apply to them).
sdpo_python() {
    SDPO_CMD=("$SDPO_PYTHON" "$1")
    _sdpo_add_profile
}

# The wrapper's profile, then the user's CONFIG preset (sdpo_config_var): later --config files win.
_sdpo_add_profile() {
    [[ -n $SDPO_PROFILE ]] && SDPO_CMD+=(--config "$SDPO_PROFILE")
    if [[ -n ${CONFIG:-} ]]; then
        sdpo_input_path CONFIG
        sdpo_check_exists CONFIG file
        SDPO_CMD+=(--config "$CONFIG")
    fi
    return 0
}

# SDPO_CMD=( launcher for SCRIPT ): plain python when WORLD_SIZE is 1 (or unset), else
# `accelerate launch --num_processes WORLD_SIZE [--config_file ACCELERATE_CONFIG]`, plus the
# machine flags when NUM_MACHINES > 1 (multi-node: one launcher per node).
sdpo_launcher() {
    local script=$1 world=${WORLD_SIZE:-1}
    if (( 10#$world <= 1 )); then
        SDPO_CMD=("$SDPO_PYTHON" "$script")
        _sdpo_add_profile
        return
    fi
    local accelerate="accelerate"
    [[ -x $(dirname "$SDPO_PYTHON")/accelerate ]] && accelerate="$(dirname "$SDPO_PYTHON")/accelerate"
    if [[ $SDPO_DRY_RUN == 0 ]] && ! command -v "$accelerate" >/dev/null; then
        sdpo_die "WORLD_SIZE=$world needs accelerate, not found next to $SDPO_PYTHON or on PATH (pip install accelerate, or WORLD_SIZE=1)"
    fi
    SDPO_CMD=("$accelerate" launch)
    [[ -n ${ACCELERATE_CONFIG:-} ]] && SDPO_CMD+=(--config_file "$ACCELERATE_CONFIG")
    SDPO_CMD+=(--num_processes "$world")
    if (( 10#${NUM_MACHINES:-1} > 1 )); then
        SDPO_CMD+=(--num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
            --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT")
    fi
    SDPO_CMD+=("$script")
    _sdpo_add_profile
}

# sdpo_flag --flag NAME: append `--flag "$NAME"` to SDPO_CMD unless NAME is empty (not set: the
# entry point's default, a --config YAML or the profile decides).
sdpo_flag() {
    local flag=$1 name=$2
    [[ -n ${!name:-} ]] || return 0
    SDPO_CMD+=("$flag" "${!name}")
}

# sdpo_output_dir_flag: `--output_dir "$OUTPUT_DIR"`, except when OUTPUT_DIR is only the wrapper's
# made-up default and a --config YAML (CONFIG or the arguments') names an output_dir: the file decides.
sdpo_output_dir_flag() {
    [[ $_SDPO_DEFAULTED == *" OUTPUT_DIR "* ]] && sdpo_config_sets output_dir && return 0
    sdpo_flag --output_dir OUTPUT_DIR
}

# sdpo_words_flag --flag NAME: append `--flag word1 word2 ...` (NAME split on spaces and commas),
# under the same rule as sdpo_flag.
sdpo_words_flag() {
    local flag=$1 name=$2 words=()
    [[ -n ${!name:-} ]] || return 0
    read -r -a words <<<"${!name//,/ }"
    [[ ${#words[@]} -gt 0 ]] || return 0
    SDPO_CMD+=("$flag" "${words[@]}")
}

# sdpo_input_paths NAME: sdpo_input_path for each word of a space-separated list.
sdpo_input_paths() {
    local name=$1 word words=() resolved=() _sdpo_word
    read -r -a words <<<"${!name}"
    for word in ${words[@]+"${words[@]}"}; do
        _sdpo_word=$word
        sdpo_input_path _sdpo_word
        resolved+=("$_sdpo_word")
    done
    printf -v "$name" '%s' "${resolved[*]-}"
}

# Print (dry run) or run one command; commands are also echoed to stderr before a real run.
sdpo_run() {
    if [[ $SDPO_DRY_RUN == 1 ]]; then
        printf '%s\n' "$(sdpo_render "$@")"
        return 0
    fi
    printf '+ %s\n' "$(sdpo_render "$@")" >&2
    "$@"
}

# Like sdpo_run for the last command of a wrapper: exec, so signals (SLURM's SIGTERM before a
# time limit) reach Python directly.
sdpo_exec() {
    if [[ $SDPO_DRY_RUN == 1 ]]; then
        printf '%s\n' "$(sdpo_render "$@")"
        exit 0
    fi
    printf '+ %s\n' "$(sdpo_render "$@")" >&2
    exec "$@"
}
