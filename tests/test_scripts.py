"""The bash wrappers in scripts/ (and the SLURM templates), driven through bash.

What every wrapper promises: env-var overrides reach the right flags, `--dry-run` prints the
resolved command and leaves the disk alone, secrets never show, extra arguments reach Python
intact, missing required variables stop the run with the variable's name, WORLD_SIZE picks the
launcher, the README tables match `--help`, and shellcheck is clean. Real-mode behaviour is
checked with a stand-in interpreter (SDPO_PYTHON) that records its argv; two real runs on a
tiny model prove the wrappers drive the actual entry points.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
SLURM = SCRIPTS / "slurm"
FIXTURE = REPO / "tests" / "fixtures" / "offline" / "interactions.jsonl"
ENV_SECRET = "sk-ant-PLANTED-env-0123456789abcdef"
DOTENV_SECRET = "hf_PLANTEDdotenv9876543210zyx"
TEMPLATES = sorted(p.name for p in SLURM.glob("*.sbatch"))
# Variables of the calling environment that would change what the wrappers resolve.
CLEARED = ("BASE_WORK", "SCRATCH", "OUTPUT_DIR", "CACHE_DIR", "HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR",
           "VLLM_CACHE_ROOT", "HF_TOKEN_PATH", "PYTHONPATH", "WORLD_SIZE", "SDPO_PYTHON", "SDPO_RUN_TAG")


# --------------------------------------------------------------------------- helpers

def clean_env(base_work: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in CLEARED and not k.startswith("SLURM_") and not re.search(r"(_KEY|_TOKEN|_SECRET|PASSWORD)$", k)}
    env.update(BASE_WORK=str(base_work), SDPO_ENV_FILE="", HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run(script: Path, *args: str, env: dict, cwd: Path | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
    """Printed commands as argv lists (shlex undoes the quoting); comment lines skipped."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def has_pair(argv: list[str], flag: str, *values: str) -> bool:
    """`flag` directly followed by `values` somewhere in argv."""
    n = len(values)
    return any(argv[i] == flag and argv[i + 1:i + 1 + n] == list(values) for i in range(len(argv) - n))


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture()
def work(tmp_path):
    """An empty BASE_WORK, a separate empty current folder, and a stand-in interpreter."""
    base = tmp_path / "base_work"
    base.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.jsonl"
    # Records argv (and the launcher's name) instead of running anything; accelerate sits next to
    # it, where the wrappers look for it.
    stand_in = (f"#!{sys.executable}\nimport json, os, sys\n"
                f"with open({str(record)!r}, 'a') as f:\n"
                "    f.write(json.dumps({'exe': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:],"
                " 'hf_home': os.environ.get('HF_HOME'), 'pythonpath': os.environ.get('PYTHONPATH')}) + '\\n')\n")
    for name in ("python", "accelerate"):
        (bin_dir / name).write_text(stand_in)
        (bin_dir / name).chmod(0o755)
    return {"base": base, "cwd": cwd, "python": bin_dir / "python", "record": record, "tmp": tmp_path}


def recorded(work) -> list[dict]:
    if not work["record"].exists():
        return []
    return [json.loads(line) for line in work["record"].read_text().splitlines()]


# --------------------------------------------------------------------------- per-script cases

# script -> (environment that makes it runnable with overrides, [(flag, value...), ...] expected)
CASES = {
    "eval_online_sdpo.sh": (
        {"MODEL": "my-org/policy", "USER_SIMULATOR": "local", "USER_MODEL": "my-org/user", "JUDGE": "rule",
         "STYLE": "concise_casual_beginner", "EVAL_STYLES": "no_emojis,no_lists", "LR": "1e-5",
         "LOSS_MODE": "simple_signal",
         "TRAIN_N": "4", "EVAL_N": "6", "EVAL_EVERY": "2", "TRAIN_STEPS_PER_EXAMPLE": "2", "SEED": "7",
         "DATA_DIR": "data/samples", "BASELINE_MODEL": "my-org/base", "OUTPUT_DIR": "{tmp}/online"},
        [("--model", "my-org/policy"), ("--user_simulator", "local"), ("--user_model_name_or_path", "my-org/user"),
         ("--judge", "rule"), ("--style", "concise_casual_beginner"), ("--eval_styles", "no_emojis,no_lists"),
         ("--lr", "1e-5"), ("--loss_mode", "simple_signal"), ("--train_n", "4"), ("--eval_n", "6"),
         ("--eval_every", "2"),
         ("--train_steps_per_example", "2"), ("--seed", "7"), ("--train_jsonl", str(REPO / "data/samples/train.jsonl")),
         ("--val_jsonl", str(REPO / "data/samples/validation.jsonl")), ("--baseline_model", "my-org/base"),
         ("--output_dir", "{tmp}/online")]),
    "train_offline_sdpo.sh": (
        {"TRAIN_JSONL": FIXTURE, "BASE_MODEL": "my-org/base-7b", "LR": "3e-5", "BS": "2", "GA": "16",
         "NUM_EPOCHS": "3", "WORLD_SIZE": "1", "OUTPUT_DIR": "{tmp}/out offline"},
        [("--train_jsonl", str(FIXTURE)), ("--base_model", "my-org/base-7b"), ("--learning_rate", "3e-5"),
         ("--batch_size", "2"), ("--grad_accum", "16"), ("--num_epochs", "3"), ("--output_dir", "{tmp}/out offline")]),
    "train_offline_sft.sh": (  # the SDPO wrapper's body with the SFT baseline's entry point
        {"TRAIN_JSONL": FIXTURE, "BASE_MODEL": "my-org/base-7b", "LR": "3e-5", "BS": "2", "GA": "16",
         "NUM_EPOCHS": "3", "WORLD_SIZE": "1", "OUTPUT_DIR": "{tmp}/out sft"},
        [("--train_jsonl", str(FIXTURE)), ("--base_model", "my-org/base-7b"), ("--learning_rate", "3e-5"),
         ("--batch_size", "2"), ("--grad_accum", "16"), ("--num_epochs", "3"), ("--output_dir", "{tmp}/out sft")]),
    "eval_checkpoints.sh": (
        {"CHECKPOINTS": "/ckpt/a /ckpt/b", "BASELINE_MODEL": "my-org/baseline",
         "EVAL_STYLES": "no_emojis concise_casual_beginner",
         "USER_MODEL": "my-org/judge", "EVAL_N": "7", "JUDGE": "local", "DATA_DIR": str(REPO / "data" / "samples"),
         "OUTPUT_DIR": "{tmp}/ckpt_eval"},
        [("--checkpoints", "/ckpt/a", "/ckpt/b"), ("--baseline_model", "my-org/baseline"),
         ("--eval_styles", "no_emojis", "concise_casual_beginner"), ("--judge_model", "my-org/judge"),
         ("--eval_n", "7"), ("--judge", "local"), ("--data_dir", str(REPO / "data" / "samples")),
         ("--output_dir", "{tmp}/ckpt_eval")]),
    "eval_incontext_oracle.sh": (
        {"MODEL": "my-org/policy", "JUDGE_MODEL": "my-org/judge", "JUDGE": "vllm", "EVAL_N": "9",
         "DATA_DIR": str(REPO / "data" / "samples"), "EVAL_STYLES": "no_emojis", "OUTPUT_DIR": "{tmp}/oracle"},
        [("--model", "my-org/policy"), ("--judge_model", "my-org/judge"), ("--judge", "vllm"), ("--eval_n", "9"),
         ("--data_dir", str(REPO / "data" / "samples")), ("--eval_styles", "no_emojis"),
         ("--output_dir", "{tmp}/oracle")]),
    "run_signal_analysis.sh": (
        {"MODEL": "my-org/scorer", "CASES_JSON": REPO / "auxiliary" / "signal_analysis_cases.json", "N_CASES": "5",
         "OUTPUT_DIR": "{tmp}/signals"},
        [("--model", "my-org/scorer"), ("--cases_json", str(REPO / "auxiliary" / "signal_analysis_cases.json")),
         ("--n_cases", "5"), ("--output_dir", "{tmp}/signals")]),
    "eval_benchmarks.sh": (
        {"CHECKPOINTS": "/ckpt/a /ckpt/b", "BASELINE_MODEL": "my-org/baseline", "TASKS": "ifeval,alpaca_eval",
         "LIMIT": "5", "BACKEND": "vllm", "BASE_MODEL": "my-org/base", "ALPACA_ANNOTATOR": "claude",
         "OUTPUT_DIR": "{tmp}/bench"},
        [("--checkpoints", "/ckpt/a", "/ckpt/b"), ("--baseline_model", "my-org/baseline"),
         ("--tasks", "ifeval,alpaca_eval"), ("--limit", "5"), ("--backend", "vllm"), ("--base_model", "my-org/base"),
         ("--alpaca_annotator", "claude"), ("--output_dir", "{tmp}/bench")]),
    "prepare_data.sh": (
        {"DATASETS": "helpsteer wildchat", "DATA_ROOT": "{tmp}/data root", "HELPSTEER_SOURCE": "/mirror/HelpSteer2",
         "WILDCHAT_SOURCE": "/mirror/WildChat"},
        [("--dataset", "/mirror/HelpSteer2"), ("--out_dir", "{tmp}/data root/helpsteer_prompts"),
         ("--dataset", "/mirror/WildChat"), ("--out_dir", "{tmp}/data root/wildchat")]),
}
WRAPPERS = sorted(CASES)


TEMPLATE_WRAPPERS = {"online_preferences.sh": "eval_online_sdpo.sh"}  # a template named apart from its wrapper


def case_env(name: str, work, **extra) -> dict:
    settings, _ = CASES[TEMPLATE_WRAPPERS.get(name, name)]
    filled = {k: str(v).replace("{tmp}", str(work["tmp"])) for k, v in settings.items()}
    return clean_env(work["base"], **{**filled, **extra})


def expected_pairs(name: str, work) -> list[tuple[str, ...]]:
    return [tuple(part.replace("{tmp}", str(work["tmp"])) for part in pair) for pair in CASES[name][1]]


# --------------------------------------------------------------------------- dry run

@pytest.mark.parametrize("name", WRAPPERS)
def test_dry_run_prints_the_overridden_values_and_touches_nothing(name, work):
    result = run(SCRIPTS / name, "--dry-run", env=case_env(name, work), cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    argvs = commands(result.stdout)
    assert argvs, "nothing printed"
    for pair in expected_pairs(name, work):
        assert any(has_pair(argv, *pair) for argv in argvs), (pair, result.stdout)
    for argv in argvs:  # caches go inside CACHE_DIR = BASE_WORK/sdpo_cache when the user set none
        assert f"HF_HOME={work['base']}/sdpo_cache/huggingface" in argv
    # nothing created: not in BASE_WORK, not in the current folder, no output folder
    assert tree(work["base"]) == [] and tree(work["cwd"]) == []
    assert sorted(p.name for p in work["tmp"].iterdir()) == ["base_work", "bin", "cwd"]
    assert recorded(work) == []


@pytest.mark.parametrize("name", ["eval_online_sdpo.sh", "train_offline_sdpo.sh", "eval_checkpoints.sh",
                                  "eval_incontext_oracle.sh", "run_signal_analysis.sh"])
def test_default_output_dir_lives_under_base_work_and_is_not_created(name, work):
    env = case_env(name, work)
    env.pop("OUTPUT_DIR")
    result = run(SCRIPTS / name, "--dry-run", env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    assert output_dir.parent == work["base"] / "sdpo_outputs"
    assert not output_dir.exists() and tree(work["base"]) == []


def test_base_work_falls_back_to_scratch_then_tmpdir(work):
    env = case_env("run_signal_analysis.sh", work)
    for key in ("BASE_WORK", "OUTPUT_DIR"):
        env.pop(key)
    scratch, tmpdir = work["tmp"] / "scratch", work["tmp"] / "tmpdir"
    out = run(SCRIPTS / "run_signal_analysis.sh", "--dry-run",
              env={**env, "SCRATCH": str(scratch), "TMPDIR": str(tmpdir)})
    assert f"HF_HOME={scratch}/sdpo_cache/huggingface" in out.stdout
    assert f"{scratch}/sdpo_outputs/signal_analysis_" in out.stdout
    out = run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", env={**env, "TMPDIR": str(tmpdir)})
    assert f"HF_HOME={tmpdir}/sdpo_cache/huggingface" in out.stdout
    # a cache the user chose is kept, and then not printed as the wrapper's own setting
    out = run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", env={**env, "TMPDIR": str(tmpdir), "HF_HOME": "/my/hf"})
    assert "HF_HOME=" not in out.stdout and f"TORCH_HOME={tmpdir}/sdpo_cache/torch" in out.stdout
    assert not scratch.exists() and not tmpdir.exists()


def test_default_paths_resolve_from_the_repo_whatever_the_current_folder(work):
    env = case_env("run_signal_analysis.sh", work)
    env.pop("CASES_JSON")
    result = run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", env=env, cwd=work["cwd"])
    (argv,) = commands(result.stdout)
    # not set: no flag; the entry point's default (tried from the repo root) applies
    assert result.returncode == 0 and "--cases_json" not in argv
    # a relative path that exists from the current folder is taken from there, made absolute
    (work["cwd"] / "mine.json").write_text("[]")
    result = run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", env={**env, "CASES_JSON": "./mine.json"},
                 cwd=work["cwd"])
    assert has_pair(commands(result.stdout)[0], "--cases_json", str(work["cwd"] / "mine.json"))


# --------------------------------------------------------------------------- secrets and .env

@pytest.mark.parametrize("name", WRAPPERS + TEMPLATES)
def test_secrets_never_printed(name, work):
    script = SLURM / name if name.endswith(".sbatch") else SCRIPTS / name
    dotenv = work["tmp"] / "secrets.env"
    dotenv.write_text(f"HF_TOKEN={DOTENV_SECRET}\nMY_SERVICE_PASSWORD='pw-PLANTED-42'\n")
    env = case_env(name.replace(".sbatch", ".sh"), work, ANTHROPIC_API_KEY=ENV_SECRET, SDPO_ENV_FILE=dotenv)
    # secrets passed on as arguments too: by value, after a credential flag, and as --flag=value
    args = ["--dry-run", "--note", f"key {ENV_SECRET}", "--extra", DOTENV_SECRET, "--api_key", "other-PLANTED-1",
            "--db-password=other-PLANTED-2"]
    result = run(script, *args, env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    for secret in (ENV_SECRET, DOTENV_SECRET, "pw-PLANTED-42", "other-PLANTED-1", "other-PLANTED-2"):
        assert secret not in printed
    # masked values stay paste-ready: a reference to the variable
    assert '"$ANTHROPIC_API_KEY"' in printed and '"$HF_TOKEN"' in printed


def test_real_run_passes_secrets_to_python_but_masks_the_echo(work):
    dotenv = work["tmp"] / "secrets.env"
    dotenv.write_text(f"HF_TOKEN={DOTENV_SECRET}\n")
    env = case_env("run_signal_analysis.sh", work, SDPO_PYTHON=work["python"], SDPO_ENV_FILE=dotenv)
    result = run(SCRIPTS / "run_signal_analysis.sh", "--tag", DOTENV_SECRET, env=env)
    assert result.returncode == 0, result.stderr
    assert DOTENV_SECRET not in result.stderr + result.stdout and "+ " in result.stderr  # the echoed command
    (call,) = recorded(work)
    assert call["argv"][-2:] == ["--tag", DOTENV_SECRET]  # Python itself gets the real value


def test_dotenv_is_sourced_and_the_environment_wins(work):
    dotenv = work["tmp"] / "settings.env"
    dotenv.write_text(
        "# comment\nN_CASES=11\nMODEL=from-dotenv/model\nexport CASES_JSON=\"auxiliary/signal_analysis_cases.json\"\n")
    env = case_env("run_signal_analysis.sh", work, SDPO_ENV_FILE=dotenv)
    env.pop("N_CASES")
    env.pop("CASES_JSON")
    env["MODEL"] = "from-env/model"
    (argv,) = commands(run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", env=env).stdout)
    assert has_pair(argv, "--n_cases", "11") and has_pair(argv, "--model", "from-env/model")
    # a named .env that does not exist is an error, not silently skipped
    result = run(SCRIPTS / "run_signal_analysis.sh", "--dry-run",
                 env={**env, "SDPO_ENV_FILE": str(work["tmp"] / "nope")})
    assert result.returncode != 0 and "SDPO_ENV_FILE" in result.stderr


def test_dotenv_in_the_repo_root_is_found(work):
    """The default .env is the one next to scripts/: tried on a copy of scripts/, never the real repo."""
    repo_copy = work["tmp"] / "repo"
    shutil.copytree(SCRIPTS, repo_copy / "scripts")
    (repo_copy / ".env").write_text(f"N_CASES=13\nANTHROPIC_API_KEY={ENV_SECRET}\n")
    env = case_env("run_signal_analysis.sh", work)
    env.pop("SDPO_ENV_FILE")
    env.pop("N_CASES")
    result = run(repo_copy / "scripts" / "run_signal_analysis.sh", "--dry-run", env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert has_pair(argv, "--n_cases", "13") and ENV_SECRET not in result.stdout + result.stderr


# --------------------------------------------------------------------------- pass-through

@pytest.mark.parametrize("name", WRAPPERS)
def test_extra_arguments_reach_python_unchanged(name, work):
    extra = ["--foo", "a b", "--empty", "", "--glob", "*.json", "--quote", "it's \"x\" $HOME"]
    env = case_env(name, work, SDPO_PYTHON=work["python"])
    dry = run(SCRIPTS / name, "--dry-run", *extra, env=env, cwd=work["cwd"])
    assert dry.returncode == 0, dry.stderr
    for argv in commands(dry.stdout):
        assert argv[-len(extra):] == extra
    real = run(SCRIPTS / name, *extra, env=env, cwd=work["cwd"])
    assert real.returncode == 0, real.stderr
    calls = recorded(work)
    assert calls and all(call["argv"][-len(extra):] == extra for call in calls)
    # what the dry run printed is what ran
    assert [call["argv"] for call in calls] == [argv[argv.index(str(work["python"])) + 1:]
                                                for argv in commands(dry.stdout)]


def test_double_dash_passes_wrapper_options_on(work):
    env = case_env("run_signal_analysis.sh", work, SDPO_PYTHON=work["python"])
    result = run(SCRIPTS / "run_signal_analysis.sh", "--", "--dry-run", "--help", env=env)
    assert result.returncode == 0, result.stderr
    (call,) = recorded(work)
    assert call["argv"][-2:] == ["--dry-run", "--help"]
    assert call["hf_home"] == f"{work['base']}/sdpo_cache/huggingface" and call["pythonpath"].split(":")[0] == str(REPO)


def test_flags_win_over_env_vars_because_they_come_last(work):
    env = case_env("run_signal_analysis.sh", work)
    (argv,) = commands(run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", "--n_cases", "2", env=env).stdout)
    assert argv.index("--n_cases") < len(argv) - 2 and argv[-2:] == ["--n_cases", "2"]


def test_config_yaml_keys_are_left_to_the_file_unless_the_env_var_is_set(work):
    yaml_file = work["tmp"] / "run.yaml"
    yaml_file.write_text("n_cases: 3\nmodel: yaml/model\n")
    env = case_env("run_signal_analysis.sh", work)
    env.pop("N_CASES")  # not set by the user: the YAML decides
    env["MODEL"] = "env/model"  # set by the user: wins over the YAML
    (argv,) = commands(run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", "--config", str(yaml_file), env=env).stdout)
    assert "--n_cases" not in argv and has_pair(argv, "--model", "env/model") and has_pair(argv, "--config",
                                                                                           str(yaml_file))


OUTPUT_DIR_WRAPPERS = ["eval_online_sdpo.sh", "train_offline_sdpo.sh", "train_offline_sft.sh", "eval_checkpoints.sh",
                       "eval_incontext_oracle.sh", "run_signal_analysis.sh", "eval_benchmarks.sh"]


@pytest.mark.parametrize("how", ["CONFIG", "--config"])
@pytest.mark.parametrize("name", OUTPUT_DIR_WRAPPERS)
def test_a_config_output_dir_beats_the_wrappers_default_but_not_output_dir_you_set(name, how, work):
    yaml_file = work["tmp"] / "mine.yaml"
    yaml_file.write_text("output_dir: /somewhere/mine\n")
    env = case_env(name, work)
    env.pop("OUTPUT_DIR")
    args = ["--dry-run"]
    if how == "CONFIG":
        env["CONFIG"] = str(yaml_file)
    else:
        args += ["--config", str(yaml_file)]
    result = run(SCRIPTS / name, *args, env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert has_pair(argv, "--config", str(yaml_file)) and "--output_dir" not in argv, result.stdout
    env["OUTPUT_DIR"] = str(work["tmp"] / "chosen")  # set by the user: wins over the file
    (argv,) = commands(run(SCRIPTS / name, *args, env=env, cwd=work["cwd"]).stdout)
    assert has_pair(argv, "--output_dir", str(work["tmp"] / "chosen"))


# --------------------------------------------------------------------------- required variables and bad values

@pytest.mark.parametrize("name,missing",
                         [("train_offline_sdpo.sh", "TRAIN_JSONL"), ("eval_checkpoints.sh", "CHECKPOINTS"),
                                          ("eval_checkpoints.sh", "BASELINE_MODEL")])
@pytest.mark.parametrize("dry", [True, False])
def test_missing_required_variable_is_named_and_nothing_starts(name, missing, dry, work):
    env = case_env(name, work, SDPO_PYTHON=work["python"])
    env.pop(missing)
    result = run(SCRIPTS / name, *(["--dry-run"] if dry else []), env=env)
    assert result.returncode != 0
    assert missing in result.stderr and result.stdout == ""
    assert recorded(work) == [] and tree(work["base"]) == []


@pytest.mark.parametrize("name,setting,message", [
    ("train_offline_sdpo.sh", {"WORLD_SIZE": "two"}, "WORLD_SIZE=two"),
    ("train_offline_sdpo.sh", {"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ("train_offline_sdpo.sh", {"LR": "fast"}, "LR=fast"),
    ("train_offline_sdpo.sh", {"WORLD_SIZE": "8", "NUM_MACHINES": "2"}, "MAIN_PROCESS_IP"),
    ("train_offline_sdpo.sh", {"WORLD_SIZE": "3", "NUM_MACHINES": "2", "MAIN_PROCESS_IP": "h"},
     "multiple of NUM_MACHINES"),
    ("eval_checkpoints.sh", {"JUDGE": "gpt"}, "rule local claude vllm"),
    ("eval_checkpoints.sh", {"EVAL_N": "-1"}, "EVAL_N"),
    ("prepare_data.sh", {"DATASETS": "helpsteer nope"}, "nope"),
])
def test_bad_values_fail_before_anything_starts(name, setting, message, work):
    env = case_env(name, work, SDPO_PYTHON=work["python"], **setting)
    result = run(SCRIPTS / name, env=env)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert recorded(work) == []


def test_claude_without_api_key_stops_a_real_run_and_warns_in_a_dry_run(work):
    env = case_env("eval_checkpoints.sh", work, SDPO_PYTHON=work["python"], JUDGE="claude")
    result = run(SCRIPTS / "eval_checkpoints.sh", env=env)
    assert result.returncode != 0 and "ANTHROPIC_API_KEY" in result.stderr and recorded(work) == []
    dry = run(SCRIPTS / "eval_checkpoints.sh", "--dry-run", env=env)
    assert dry.returncode == 0 and "ANTHROPIC_API_KEY" in dry.stderr
    ok = run(SCRIPTS / "eval_checkpoints.sh", env={**env, "ANTHROPIC_API_KEY": ENV_SECRET})
    assert ok.returncode == 0 and len(recorded(work)) == 1


def test_missing_input_file_stops_a_real_run(work):
    env = case_env("train_offline_sdpo.sh", work, SDPO_PYTHON=work["python"], TRAIN_JSONL=work["tmp"] / "none.jsonl")
    result = run(SCRIPTS / "train_offline_sdpo.sh", env=env)
    assert result.returncode != 0 and "none.jsonl not found" in result.stderr and recorded(work) == []
    # where the data comes from, as DATA_DIR's message says (it named the missing file only)
    assert "scripts/prepare_data.sh writes" in result.stderr and "data/samples/interactions.jsonl" in result.stderr


# --------------------------------------------------------------------------- launcher

def test_world_size_picks_the_launcher(work):
    env = case_env("train_offline_sdpo.sh", work, SDPO_PYTHON=work["python"], WORLD_SIZE="2")
    (argv,) = commands(run(SCRIPTS / "train_offline_sdpo.sh", "--dry-run", env=env).stdout)
    launch = [a for a in argv if "=" not in a]
    assert Path(launch[0]).name == "accelerate" and launch[1:4] == ["launch", "--config_file",
                                                                    str(REPO / "multigpu_accelerate_config.yaml")]
    assert has_pair(argv, "--num_processes", "2") and "--num_machines" not in argv
    assert launch[launch.index("--num_processes") + 2] == str(REPO / "offline_sdpo" / "main_offline_sdpo.py")
    run(SCRIPTS / "train_offline_sdpo.sh", env=env)
    (call,) = recorded(work)
    assert call["exe"] == "accelerate" and call["argv"][:5] == ["launch", "--config_file",
                                                                str(REPO / "multigpu_accelerate_config.yaml"),
                                                                 "--num_processes", "2"]
    # WORLD_SIZE=1: plain python, even with an accelerate config
    (argv,) = commands(run(SCRIPTS / "train_offline_sdpo.sh", "--dry-run", env={**env, "WORLD_SIZE": "1"}).stdout)
    assert "launch" not in argv and argv[argv.index(str(work["python"])) + 1] == str(
        REPO / "offline_sdpo" / "main_offline_sdpo.py")


def test_multi_node_flags(work):
    env = case_env("train_offline_sdpo.sh", work, WORLD_SIZE="8", NUM_MACHINES="2", MAIN_PROCESS_IP="10.0.0.1",
                   SLURM_NODEID="1")
    (argv,) = commands(run(SCRIPTS / "train_offline_sdpo.sh", "--dry-run", env=env).stdout)
    for pair in [("--num_processes", "8"), ("--num_machines", "2"), ("--machine_rank", "1"),
                 ("--main_process_ip", "10.0.0.1"), ("--main_process_port", "29500")]:
        assert has_pair(argv, *pair), pair


def test_single_process_tools_ignore_world_size(work):
    env = case_env("run_signal_analysis.sh", work, WORLD_SIZE="4")
    (argv,) = commands(run(SCRIPTS / "run_signal_analysis.sh", "--dry-run", env=env).stdout)
    assert "launch" not in argv


# --------------------------------------------------------------------------- SLURM templates

@pytest.fixture()
def fake_scontrol(work):
    bin_dir = work["tmp"] / "slurm_bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    return str(bin_dir)


def test_offline_template_multi_node_dry_run(work, fake_scontrol):
    env = case_env("train_offline_sdpo.sh", work, SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
                   SLURM_JOB_ID="4242",
                   SLURM_GPUS_ON_NODE="4", PATH=f"{fake_scontrol}:{os.environ['PATH']}")
    for key in ("WORLD_SIZE", "OUTPUT_DIR"):
        env.pop(key)
    result = run(SLURM / "train_offline_sdpo.sbatch", "--dry-run", "--foo", "a b", env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    srun = shlex.split(lines[0])
    assert "srun" in srun and has_pair(srun, "--nodes", "2") and has_pair(srun, "--ntasks-per-node", "1")
    assert srun[-3:] == ["--", "--foo", "a b"] and "WORLD_SIZE=8" in srun and "MAIN_PROCESS_IP=gpu07" in srun
    per_node = [shlex.split(line.split("runs: ", 1)[1]) for line in lines[1:]]
    assert len(per_node) == 2
    output_dirs = set()
    for rank, argv in enumerate(per_node):
        for pair in [("launch", "--config_file"), ("--num_processes", "8"), ("--num_machines", "2"),
                     ("--machine_rank", str(rank)),
                     ("--main_process_ip", "gpu07"), ("--main_process_port", str(20000 + 4242 % 10000))]:
            assert has_pair(argv, *pair), (rank, pair)
        assert argv[-2:] == ["--foo", "a b"]
        output_dirs.add(argv[argv.index("--output_dir") + 1])
    assert output_dirs == {f"{work['base']}/sdpo_outputs/offline_base-7b_job4242"}  # one folder for all nodes
    assert tree(work["base"]) == [] and tree(work["cwd"]) == []


def test_offline_template_single_node_and_gpu_count(work):
    env = case_env("train_offline_sdpo.sh", work, GPUS_PER_NODE="2")
    env.pop("WORLD_SIZE")
    result = run(SLURM / "train_offline_sdpo.sbatch", "--dry-run", env=env)
    (argv,) = commands(result.stdout)
    assert has_pair(argv, "--num_processes", "2") and "--num_machines" not in argv and "srun" not in argv
    # several nodes without SLURM's host list: a clear error
    result = run(SLURM / "train_offline_sdpo.sbatch", "--dry-run",
                 env={**env, "SLURM_NNODES": "2", "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and ("scontrol" in result.stderr or "SLURM_JOB_NODELIST" in result.stderr)


@pytest.mark.parametrize("template,case", [("eval_online_sdpo.sbatch", "eval_online_sdpo.sh"),
                                           ("online_preferences.sbatch", "eval_online_sdpo.sh"),
                                           ("eval_checkpoints.sbatch", "eval_checkpoints.sh")])
def test_eval_templates_run_their_wrapper(template, case, work):
    # submitted elsewhere: found anyway
    env = case_env(case, work, SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(work["cwd"]))
    env.pop("OUTPUT_DIR")
    result = run(SLURM / template, "--dry-run", "--foo", "a b", env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert argv[-2:] == ["--foo", "a b"] and argv[argv.index("--output_dir") + 1].endswith("_job77")


def test_templates_carry_sbatch_directives():
    for template in TEMPLATES:
        text = (SLURM / template).read_text()
        assert text.startswith("#!/usr/bin/env bash\n#SBATCH ")
        assert "CUDA_VISIBLE_DEVICES" not in text


# --------------------------------------------------------------------------- docs and lint

@functools.cache  # one wrapper --help (bash, then Python for the tables) per session: two tests read each
def help_tables(script: Path) -> tuple[list[str], list[str]]:
    out = run(script, "--help", env=clean_env(Path("/nonexistent"))).stdout
    own, _, common = out.partition("Read by every wrapper:")
    rows = lambda text: [line for line in text.splitlines() if line.startswith("| `")]  # noqa: E731
    return rows(own), rows(common)


@pytest.mark.parametrize("name", WRAPPERS + ["slurm/train_offline_sdpo.sbatch"])
def test_help_matches_the_generated_docs(name):
    own, common = help_tables(SCRIPTS / name)
    docs = (REPO / "docs" / "env_vars.md").read_text()
    assert own, "no variables listed"
    assert "\n".join(own) in docs, f"docs/env_vars.md differs from {name} --help (regenerate it)"
    if common:
        assert "\n".join(common) in docs


def test_committed_env_var_docs_equal_the_generator_output():
    from auxiliary.runtime import env_vars

    assert (REPO / "docs" / "env_vars.md").read_text() == env_vars.markdown(), \
        "docs/env_vars.md is out of date: python -m auxiliary.runtime.env_vars --write docs/env_vars.md"


def test_every_wrapper_variable_maps_to_a_real_field(monkeypatch):
    from auxiliary.runtime import env_vars

    for wrapper in env_vars.WRAPPERS:
        table = env_vars.wrapper_table(wrapper)  # raises EnvVarError for a flag that is no field
        assert table.rows, wrapper
    # a mapping to a flag that is no field is caught
    monkeypatch.setattr(env_vars, "wrapper_declarations", lambda wrapper: [["field", "LR", "--no_such_field", ""]])
    with pytest.raises(env_vars.EnvVarError, match="no_such_field"):
        env_vars.wrapper_table("scripts/eval_online_sdpo.sh")


def test_paper_readme_variable_names_are_all_still_read():
    from auxiliary.runtime import env_vars

    names = {row.name for w in env_vars.WRAPPERS for row in env_vars.wrapper_table(w).rows}
    paper = {"MODEL", "USER_MODEL", "STYLE", "EVAL_STYLES", "LR", "LOSS_MODE", "TRAIN_N", "EVAL_N", "EVAL_EVERY",
             "TRAIN_STEPS_PER_EXAMPLE", "SEED", "DATA_DIR", "BASELINE_MODEL", "OUTPUT_DIR", "TRAIN_JSONL", "BASE_MODEL",
             "BS", "GA", "NUM_EPOCHS", "WORLD_SIZE", "ACCELERATE_CONFIG", "CHECKPOINTS", "JUDGE_MODEL", "CASES_JSON",
             "N_CASES"}
    assert paper - names == set()


def scripts_page() -> str:
    return (REPO / "docs" / "scripts.md").read_text()


def test_the_scripts_page_points_to_the_generated_tables_and_restates_no_default():
    section = scripts_page()
    assert "env_vars.md" in section
    assert "| `LR` |" not in section and "| `MODEL` |" not in section


def test_env_example_lists_every_variable():
    text = (REPO / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.M))
    names = set()
    for script in [*(SCRIPTS / n for n in WRAPPERS), SLURM / "train_offline_sdpo.sbatch"]:
        own, common = help_tables(script)
        names |= {row.split("`")[1] for row in own + common}
    assert names - listed == set()
    for secret in ("ANTHROPIC_API_KEY", "HF_TOKEN", "WANDB_API_KEY"):
        assert re.search(rf"^{secret}=$", text, flags=re.M), f"{secret} must be an empty placeholder"


def test_scripts_are_executable_and_strict():
    for path in [*SCRIPTS.glob("*.sh"), *SLURM.glob("*.sbatch")]:
        if path.name == "_common.sh":  # a sourced library: run on its own it would only fail
            assert not os.access(path, os.X_OK), path
            continue
        assert os.access(path, os.X_OK), path
        assert "set -euo pipefail" in path.read_text(), path
        assert "CUDA_VISIBLE_DEVICES" not in path.read_text(), path


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    files = [str(p) for p in [*SCRIPTS.glob("*.sh"), *SLURM.glob("*.sbatch")]]
    result = subprocess.run(["shellcheck", "-x", "-s", "bash", *files], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- real runs

def test_prepare_data_real_run_on_local_copies(work):
    env = clean_env(work["base"], DATASETS="helpsteer tldr", DATA_ROOT=work["tmp"] / "data",
                    HELPSTEER_SOURCE=REPO / "tests/fixtures/preprocess/helpsteer2",
                    TLDR_SOURCE=REPO / "tests/fixtures/preprocess/tldr")
    result = run(SCRIPTS / "prepare_data.sh", env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    for folder in ("helpsteer_prompts", "tldr_prompts_unique"):
        for split in ("train", "validation"):
            lines = (work["tmp"] / "data" / folder / f"{split}.jsonl").read_text().splitlines()
            assert lines and all("prompt" in json.loads(line) for line in lines)


@pytest.mark.slow
def test_train_offline_real_run_on_a_tiny_model(work, tiny_model_dir):
    out = work["tmp"] / "offline out"
    env = clean_env(work["base"], TRAIN_JSONL=FIXTURE, BASE_MODEL=tiny_model_dir, WORLD_SIZE=1, BS=2, GA=1,
                    NUM_EPOCHS=1,
                    OUTPUT_DIR=out, ANTHROPIC_API_KEY=ENV_SECRET)
    result = run(SCRIPTS / "train_offline_sdpo.sh", "--max_steps", "2", "--save_steps", "100", env=env, cwd=work["cwd"],
                 timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").exists() and (out / "offline_sdpo_config.json").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics if "loss" in m)
    config = json.loads((out / "offline_sdpo_config.json").read_text())
    assert config["batch_size"] == 2 and config["grad_accum"] == 1 and config["model"] == tiny_model_dir
    assert ENV_SECRET not in result.stdout + result.stderr
    assert tree(work["cwd"]) == []  # nothing written where it ran from


def test_online_model_flags_follow_the_chosen_simulator_and_judge(work):
    env = case_env("eval_online_sdpo.sh", work, USER_SIMULATOR="rule", JUDGE="local")
    (argv,) = commands(run(SCRIPTS / "eval_online_sdpo.sh", "--dry-run", env=env).stdout)
    # the user model is only named for a model simulator; the judge model defaults to USER_MODEL
    assert "--user_model_name_or_path" not in argv and has_pair(argv, "--judge_model", "my-org/user")
    (argv,) = commands(run(SCRIPTS / "eval_online_sdpo.sh", "--dry-run", env={**env, "JUDGE_MODEL": "my-org/j"}).stdout)
    assert has_pair(argv, "--judge_model", "my-org/j")
    # seed defaults: a Claude user and judge, from the wrapper's profile; every other default is
    # the entry point's, so nothing the user did not set is passed
    defaults = clean_env(work["base"], DATA_DIR="data/samples", ANTHROPIC_API_KEY=ENV_SECRET)
    (argv,) = commands(run(SCRIPTS / "eval_online_sdpo.sh", "--dry-run", env=defaults).stdout)
    assert has_pair(argv, "--config", str(REPO / "configs" / "wrappers" / "eval_online_sdpo.yaml"))
    for flag in ("--model", "--user_simulator", "--judge", "--style", "--lr", "--loss_mode", "--train_n", "--eval_n",
                 "--eval_every", "--train_steps_per_example", "--seed", "--eval_styles", "--baseline_model"):
        assert flag not in argv, flag
    assert "--user_model_name_or_path" not in argv and "--judge_model" not in argv  # Qwen ids mean nothing to Claude
    # what that command resolves to: the paper repository's quick-start settings
    python_argv = argv[next(i for i, a in enumerate(argv) if a.endswith("eval_online_sdpo.py")):]
    resolved = subprocess.run([sys.executable, *python_argv, "--print_config"], cwd=REPO, capture_output=True,
                              text=True,
                              env={**defaults, "PYTHONPATH": str(REPO)}, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    import yaml

    config = yaml.safe_load(resolved.stdout)
    expected = {"model": "Qwen/Qwen3-8B", "user_simulator": "claude", "judge": "claude", "style": "no_emojis",
                "lr": 5e-6,
                "loss_mode": "full_distillation", "train_n": 15, "eval_n": 100, "eval_every": 3,
                "train_steps_per_example": 1, "seed": 1234, "eval_styles": "", "baseline_model": None}
    assert {key: config[key] for key in expected} == expected
    assert tree(work["base"]) == []
    claude_ids = {**defaults, "USER_MODEL": "claude-sonnet-4-5", "JUDGE_MODEL": "claude-opus-4-1"}
    (argv,) = commands(run(SCRIPTS / "eval_online_sdpo.sh", "--dry-run", env=claude_ids).stdout)
    assert has_pair(argv, "--user_model_name_or_path", "claude-sonnet-4-5") and has_pair(argv, "--judge_model",
                                                                                         "claude-opus-4-1")


@pytest.mark.parametrize("name", WRAPPERS)
def test_env_example_sources_cleanly_and_changes_no_default(name, work):
    env = case_env(name, work, SDPO_RUN_TAG="fixed")
    without = run(SCRIPTS / name, "--dry-run", env=env)
    with_example = run(SCRIPTS / name, "--dry-run", env={**env, "SDPO_ENV_FILE": str(REPO / ".env.example")})
    assert with_example.returncode == 0, with_example.stderr
    assert with_example.stdout == without.stdout


@pytest.mark.slow
def test_eval_online_real_run_on_a_tiny_model(work, tiny_model_dir):
    out = work["tmp"] / "online out"
    env = clean_env(work["base"], MODEL=tiny_model_dir, USER_SIMULATOR="rule", JUDGE="rule", STYLE="no_emojis",
                    TRAIN_N=2, EVAL_N=2, EVAL_EVERY=0, LR="1e-5", SEED=7, DATA_DIR="data/samples", OUTPUT_DIR=out,
                    ANTHROPIC_API_KEY=ENV_SECRET)
    result = run(SCRIPTS / "eval_online_sdpo.sh", "--max_new_tokens", "8", "--eval_max_new_tokens", "8",
                 env=env, cwd=work["cwd"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["sdpo"]["lr"] == 1e-5 and config["sdpo"]["seed"] == 7 and config["sdpo"]["model"] == tiny_model_dir
    assert config["run"]["train_n"] == 2 and config["run"]["style"] == "no_emojis" and config["run"][
        "user_simulator"] == "rule"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    history = json.loads((out / "eval_history.json").read_text())
    assert {row["step"] for row in history} == {0, 2} and all(row["n"] == 2 for row in history)
    assert ENV_SECRET not in result.stdout + result.stderr
    assert tree(work["cwd"]) == []


# --------------------------------------------------------------------------- one place per default

MINIMAL = {  # only what a wrapper requires
    "eval_online_sdpo.sh": {"ANTHROPIC_API_KEY": ENV_SECRET},
    "train_offline_sdpo.sh": {"TRAIN_JSONL": FIXTURE, "WORLD_SIZE": "1"},
    "eval_checkpoints.sh": {"CHECKPOINTS": "/ckpt/a", "BASELINE_MODEL": "my-org/baseline"},
    "eval_incontext_oracle.sh": {},
    "run_signal_analysis.sh": {},
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_unset_variables_pass_no_flag_only_the_profile(name, work):
    env = clean_env(work["base"], **MINIMAL[name])
    result = run(SCRIPTS / name, "--dry-run", env=env, cwd=work["cwd"])
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    flags = [a for a in argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):] if a.startswith("--")]
    required = {"train_offline_sdpo.sh": ["--train_jsonl"],
                "eval_checkpoints.sh": ["--checkpoints", "--baseline_model"]}
    profile = REPO / "configs" / "wrappers" / name.replace(".sh", ".yaml")
    expected = (["--config"] if profile.exists() else []) + required.get(name, []) + ["--output_dir"]
    assert flags == expected, argv
    if profile.exists():
        assert has_pair(argv, "--config", str(profile))
    assert tree(work["base"]) == [] and tree(work["cwd"]) == []


def test_the_profile_and_the_users_config_decide_whether_claude_needs_a_key(work):
    env = clean_env(work["base"], SDPO_PYTHON=work["python"], DATA_DIR="data/samples")
    result = run(SCRIPTS / "eval_online_sdpo.sh", env=env)  # the profile's Claude user and judge need the key
    assert result.returncode != 0 and "ANTHROPIC_API_KEY" in result.stderr and recorded(work) == []
    mine = work["tmp"] / "mine.yaml"
    mine.write_text("user_simulator: rule\njudge: 'rule'\n")
    result = run(SCRIPTS / "eval_online_sdpo.sh", "--config", str(mine), env=env)
    assert result.returncode == 0, result.stderr
    (call,) = recorded(work)
    # the profile first, the user's YAML after it (later files win), then the user's flags
    configs = [call["argv"][i + 1] for i, a in enumerate(call["argv"]) if a == "--config"]
    assert configs == [str(REPO / "configs" / "wrappers" / "eval_online_sdpo.yaml"), str(mine)]


def test_config_variable_passes_a_preset_after_the_profile_and_env_vars_still_win(work):
    preset = "configs/paper/offline_wildchat.yaml"
    env = case_env("train_offline_sdpo.sh", work, CONFIG=preset)
    env.pop("BASE_MODEL")
    (argv,) = commands(run(SCRIPTS / "train_offline_sdpo.sh", "--dry-run", env=env, cwd=work["cwd"]).stdout)
    assert has_pair(argv, "--config", str(REPO / preset))
    assert argv.index("--config") < argv.index("--learning_rate")  # LR (set) comes after the preset: it wins
    assert "--base_model" not in argv  # the preset's model is left to the preset
    (argv,) = commands(run(SCRIPTS / "eval_online_sdpo.sh", "--dry-run", env=case_env(
        "eval_online_sdpo.sh", work, CONFIG="configs/paper/online_tldr.yaml"), cwd=work["cwd"]).stdout)
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert configs == [str(REPO / "configs/wrappers/eval_online_sdpo.yaml"),
                       str(REPO / "configs/paper/online_tldr.yaml")]
    result = run(SCRIPTS / "eval_checkpoints.sh", env=case_env("eval_checkpoints.sh", work, CONFIG="nope.yaml",
                                                               SDPO_PYTHON=work["python"]))
    assert result.returncode == 2 and "CONFIG" in result.stderr and recorded(work) == []


@pytest.mark.parametrize("visible,launcher", [(None, "python"), ("", "python"), ("0", "python"), ("2,3", "accelerate")])
def test_world_size_defaults_to_the_gpus_the_machine_shows(visible, launcher, work):
    env = case_env("train_offline_sdpo.sh", work, SDPO_PYTHON=work["python"], PATH="/usr/bin:/bin")
    env.pop("WORLD_SIZE")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    else:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # and no nvidia-smi on PATH: a CPU machine
    result = run(SCRIPTS / "train_offline_sdpo.sh", env=env)
    assert result.returncode == 0, result.stderr
    (call,) = recorded(work)
    assert call["exe"] == launcher
    if launcher == "accelerate":
        assert has_pair(call["argv"], "--num_processes", "2")


def test_demo_help_lists_the_demo_variables_with_the_profiles_values():
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    profile = (REPO / "configs" / "demo.yaml").read_text()
    train_n = re.search(r"^train_n:\s*(\d+)", profile, flags=re.M).group(1)
    assert re.search(rf"^  DEMO_TRAIN_N\s+{train_n}\s+--train_n$", result.stdout, flags=re.M), result.stdout
    teacher = re.search(r"^teacher:\s*(\w+)", profile, flags=re.M).group(1)
    assert re.search(rf"^  DEMO_TEACHER\s+{teacher}\s+--teacher$", result.stdout, flags=re.M), result.stdout
    for name in ("DEMO_STYLE", "DEMO_LR", "DEMO_TEACHER", "DEMO_SEED", "DEMO_MAX_NEW_TOKENS", "OUTPUT_DIR"):
        assert name in result.stdout
    assert len(result.stdout.splitlines()) < 40  # not the entry point's 400 lines


def test_demo_accepts_dry_run_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.update(BASE_WORK=str(tmp_path), DEMO_SEED="7")
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--dry-run", "--eval_every", "5"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert "eval_online_sdpo.py --config configs/demo.yaml --seed 7 --output_dir" in line
    assert line.endswith("--eval_every 5") and "--dry-run" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, weight", [({}, None), ({"DEMO_END_SIGNAL_WEIGHT": "0.5"}, "0.5")])
def test_a_full_distillation_demo_runs_without_the_end_signal_unless_told(tmp_path, extra, weight):
    """The profile's end signal is simple_signal's: DEMO_LOSS_MODE=full_distillation alone must not be refused."""
    from auxiliary.runtime.cli import parse_dataclasses
    from eval_online_sdpo import OnlineRunConfig, OnlineSDPOConfig

    def parse_args(flags):
        return parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), flags, prog="eval_online_sdpo.py")[0]

    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.update(BASE_WORK=str(tmp_path), DEMO_LOSS_MODE="full_distillation", **extra)
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--dry-run"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    flags = argv[argv.index("eval_online_sdpo.py") + 1:]
    assert has_pair(flags, "--end_signal_weight", weight or "0")
    if weight is None:
        config = parse_args(flags)
        assert (config.loss_mode, config.end_signal_weight) == ("full_distillation", 0)
    else:  # asked for both: the objective's own rule refuses, in one line
        with pytest.raises((SystemExit, ValueError)):
            parse_args(flags)


def test_the_preferences_template_runs_the_sequential_preset_unless_given_one_and_resumes_a_requeued_job(work):
    env = case_env("eval_online_sdpo.sh", work, SLURM_JOB_ID="78")
    template = SLURM / "online_preferences.sbatch"
    (argv,) = commands(run(template, "--dry-run", env=env, cwd=work["cwd"]).stdout)
    assert has_pair(argv, "--config", str(REPO / "configs/paper/sequential.yaml")) and "--resume" not in argv
    (argv,) = commands(
        run(template, "--dry-run", "--config", "configs/paper/flip.yaml", env=env, cwd=work["cwd"]).stdout)
    assert str(REPO / "configs/paper/sequential.yaml") not in argv and has_pair(argv, "--config",
                                                                                "configs/paper/flip.yaml")
    (argv,) = commands(run(template, "--dry-run", env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=work["cwd"]).stdout)
    assert "--resume" in argv
