"""Shared pieces of the tests/test_reliability_*.py files: data, flags, the CLI as a subprocess (or in process
as a child would see it), readers.

Import as `from reliability_helpers import ...` (tests/ is on sys.path under pytest).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ONLINE_SCRIPT = REPO / "eval_online_sdpo.py"
ERROR_PREFIX = "eval_online_sdpo.py: error:"

TRAIN = [f"Tell me something about topic number {i}." for i in range(20)]
EVAL = [f"Explain idea {i} in simple terms." for i in range(4)]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def online_args(model_dir, data_dir, out, **overrides) -> list[str]:
    """eval_online_sdpo.py flags for a quick tiny-model run; True -> bare flag, None/False -> left out."""
    values = {"model": model_dir, "train_jsonl": Path(data_dir) / "train.jsonl",
              "val_jsonl": Path(data_dir) / "validation.jsonl", "style": "concise", "train_n": 4, "eval_n": 4,
              "eval_every": 2, "max_new_tokens": 8, "eval_max_new_tokens": 8, "max_prompt_tokens": 96,
              "lr": 1e-3, "loss_mode": "simple_signal", "output_dir": out, "seed": 11}
    values.update(overrides)
    return flags_from_values(values)


def tiny_updater(tokenizer, **settings):
    """An OnlineSDPOUpdater on a fresh tiny model (seed 0); `settings` are OnlineSDPOConfig fields over
    model "tiny" and seed 0 (the unit tests' updater factories build on it)."""
    from auxiliary.runtime.tiny_model import build_tiny_model
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    config = OnlineSDPOConfig(**{"model": "tiny", "seed": 0, **settings})
    return OnlineSDPOUpdater(config, build_tiny_model(tokenizer, seed=0), tokenizer)


def copy_without_chat_template(model_dir, dest: Path) -> Path:
    """A copy of a model folder whose tokenizer has no chat template (bad-input cases)."""
    import shutil

    shutil.copytree(model_dir, dest)
    config_file = dest / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    for extra in dest.glob("chat_template.*"):
        extra.unlink()
    return dest


def flags_from_values(values: dict) -> list[str]:
    """CLI flags from a dict: True -> bare flag, None/False -> left out, anything else -> `--key str(value)`."""
    argv = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def clean_env(**extra) -> dict:
    """The environment of a child run: offline, no inherited credentials or endpoints, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "HF_TOKEN", "WANDB_API_KEY", "OUTPUT_DIR")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")  # see one_torch_thread
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train.jsonl (TRAIN) and validation.jsonl (EVAL) in a folder, once per test module."""
    folder = tmp_path_factory.mktemp("prompts")
    write_prompts(folder / "train.jsonl", TRAIN)
    write_prompts(folder / "validation.jsonl", EVAL)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine run about 4x faster on one thread than on two (OpenMP
    workers spin while other jobs hold the cores). Restored afterwards: other modules keep their setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def start_cli(argv: list[str], env: dict, script: Path = ONLINE_SCRIPT, cwd: Path = REPO,
              log_path: Path | None = None) -> subprocess.Popen:
    """The script as a child process; with log_path, stdout and stderr go to that file (a pipe nobody
    reads while the test waits would fill up and stall the child)."""
    if log_path is None:
        return subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_like_a_child(entry, argv: list[str], monkeypatch, capfd, **extra_env) -> subprocess.CompletedProcess:
    """entry(argv) in this process, seen as run_cli sees the script: clean_env's environment, the INFO log
    records on stderr in order with everything else (the handler logging.basicConfig gives a terminal), and
    entry's return value as the exit code (the scripts end with sys.exit(main()))."""
    import logging

    for name in os.environ.keys() - clean_env(**extra_env).keys():
        monkeypatch.delenv(name)
    for name, value in clean_env(**extra_env).items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handler, level = logging.StreamHandler(), root.level  # sys.stderr now: capfd's
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    capfd.readouterr()
    try:
        code = entry(list(map(str, argv)))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def main_block(script: Path):
    """An entry for run_like_a_child: `script` run as `python script argv...` in this process (runpy), its
    `if __name__ == "__main__":` block included, so the exit codes that block gives are checked without a child."""
    import runpy

    def entry(argv: list[str]) -> int:
        saved = sys.argv
        sys.argv = [str(script), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exited:
            if isinstance(exited.code, str):  # sys.exit("text"): Python prints it and exits 1
                print(exited.code, file=sys.stderr)
                return 1
            return exited.code or 0
        finally:
            sys.argv = saved
        return 0

    return entry


def run_cli(argv: list[str], env: dict, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    process = start_cli(argv, env, **kw)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_in_process(entry, argv):
    """An entry point's main(argv) in this process, leaving the environment as it found it."""
    saved = dict(os.environ)
    try:
        return entry(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def read_metrics(out_dir) -> list[dict]:
    return read_jsonl(Path(out_dir) / "metrics.jsonl")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def leftover_temp_files(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (.name.XXXX.tmp) or half-made checkpoints (.partial)."""
    return [p for p in Path(folder).rglob("*") if p.name.endswith((".tmp", ".partial"))]


def anthropic_message(text: str) -> dict:
    """A Messages API reply body, for a stub that answers by itself."""
    return {"id": "msg_stub", "type": "message", "role": "assistant", "model": "claude-stub",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1}}


def without_timings(records: list[dict]) -> list[dict]:
    """metrics.jsonl rows or eval_history.json records without their wall-clock fields
    (auxiliary.online.records.TIMING_KEYS, also inside each arm's dict): what a resumed run must reproduce exactly."""
    from auxiliary.online.records import TIMING_KEYS

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_KEYS}
        return value

    return [strip(record) for record in records]
