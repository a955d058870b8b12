"""Planted ANTHROPIC_API_KEY, HF_TOKEN and WANDB_API_KEY values never reach anything a run writes or prints.

Runs, each a child process with the three values in its environment:
- an online run with a Claude user and judge against llm-katan, W&B (offline mode) and checkpoints;
- an online run whose key the server refuses: llm-katan echoes the key it received inside its 401
  body, so the exception message is the place a leak would show;
- an offline training run with W&B (offline mode) and a checkpoint;
- the dry runs of the online and offline wrappers.
Every byte of every file under each output folder (checkpoints and W&B files included) and the
captured stdout/stderr are searched. llm-katan's own log, which may hold the key it was sent, lives
in a separate folder.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from katan_server import start_katan
from reliability_helpers import REPO, clean_env, online_args, read_jsonl, run_cli, write_prompts

pytestmark = pytest.mark.slow  # 3 child processes (online with W&B, refused key, offline with W&B): ~40-60 s

SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-PLANTED-anthropic-0f1e2d3c4b5a",
           "HF_TOKEN": "hf_PLANTEDhuggingface9a8b7c6d5e",
           "WANDB_API_KEY": "PLANTEDwandb" + "0123456789abcdef" * 2}  # 40 characters, like a real one
OFFLINE_FIXTURE = REPO / "tests" / "fixtures" / "offline" / "interactions.jsonl"


def leaks(text: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in text]


def scan_tree(folder: Path) -> dict[str, list[str]]:
    """relative path -> names of the planted values found in that file's bytes."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and leaks(path.read_bytes()):
            found[str(path.relative_to(folder))] = leaks(path.read_bytes())
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from auxiliary.runtime.tiny_model import save_tiny_model

    work = tmp_path_factory.mktemp("secrets")
    model_dir = save_tiny_model(work / "tiny")
    data = work / "data"
    data.mkdir()
    write_prompts(data / "train.jsonl", ["Say hello.", "Name a colour."])
    write_prompts(data / "validation.jsonl", ["Count to three.", "Name a fruit."])
    for folder in ("katan_good", "katan_guarded"):
        (work / folder).mkdir()
    katan = start_katan(log_dir=work / "katan_good")  # outside every scanned folder
    guarded = start_katan(api_key="the-right-key", log_dir=work / "katan_guarded")
    outputs = {"online": work / "online", "refused": work / "refused", "offline": work / "offline"}
    jobs = {
        "online": (online_args(model_dir, data, outputs["online"], user_simulator="claude", judge="claude",
                               train_n=2, eval_n=2, eval_every=0, wandb=True, save_checkpoints=True),
                   clean_env(**SECRETS, ANTHROPIC_BASE_URL=katan.base_url), None),
        "refused": (online_args(model_dir, data, outputs["refused"], user_simulator="claude"),
                    clean_env(**SECRETS, ANTHROPIC_BASE_URL=guarded.base_url), None),
        "offline": (["--base_model", model_dir, "--train_jsonl", OFFLINE_FIXTURE, "--output_dir", outputs["offline"],
                     "--max_steps", "1", "--save_steps", "1", "--batch_size", "2", "--grad_accum", "1", "--wandb"],
                    clean_env(**SECRETS, WANDB_DIR=outputs["offline"]), REPO / "offline_sdpo" / "main_offline_sdpo.py"),
    }
    outputs["offline"].mkdir()  # WANDB_DIR must exist

    def run(item):
        name, (argv, env, script) = item
        return name, run_cli(argv, env, timeout=300, **({"script": script} if script else {}))

    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = dict(pool.map(run, jobs.items()))
        yield results, outputs, guarded.base_url
    finally:
        katan.stop()
        guarded.stop()


def test_online_claude_run_with_wandb_and_checkpoints_leaks_nothing(runs):
    results, outputs, _ = runs
    result, out = results["online"], outputs["online"]
    assert result.returncode == 0, result.stderr[-3000:]
    # the run did what it is supposed to: Claude answered, W&B and checkpoints were written
    assert all(m["feedback"]["followup"].startswith("[echo]") for m in read_jsonl(out / "metrics.jsonl"))
    assert list((out / "wandb").glob("offline-run-*")) and (out / "checkpoints" / "latest.json").exists()
    assert scan_tree(out) == {}
    assert leaks((result.stdout + result.stderr).encode()) == []


def test_refused_key_message_does_not_show_the_key(runs):
    import json
    import urllib.error
    import urllib.request

    results, outputs, guarded_url = runs
    # the control: this server does put the key it was sent into its 401 body, so there was a leak to stop
    request = urllib.request.Request(guarded_url + "/v1/messages", method="POST",
                                     headers={"x-api-key": SECRETS["ANTHROPIC_API_KEY"],
                                              "content-type": "application/json", "anthropic-version": "2023-06-01"},
                                     data=json.dumps({"model": "m", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401 and leaks(refused.value.read()) == ["ANTHROPIC_API_KEY"]

    result = results["refused"]
    assert result.returncode == 1 and "ANTHROPIC_API_KEY" in result.stderr and "HTTP 401" in result.stderr
    assert leaks((result.stdout + result.stderr).encode()) == []
    assert scan_tree(outputs["refused"]) == {}


def test_offline_run_with_wandb_and_checkpoint_leaks_nothing(runs):
    results, outputs, _ = runs
    result, out = results["offline"], outputs["offline"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-1").is_dir() and list(out.rglob("*.wandb"))
    assert scan_tree(out) == {}
    assert leaks((result.stdout + result.stderr).encode()) == []


@pytest.mark.parametrize("wrapper", ["eval_online_sdpo.sh", "train_offline_sdpo.sh"])
def test_dry_runs_print_no_secret(wrapper, tmp_path):
    import subprocess

    env = clean_env(**SECRETS, BASE_WORK=tmp_path, SDPO_ENV_FILE="", DATA_DIR=REPO / "data" / "samples",
                    TRAIN_JSONL=OFFLINE_FIXTURE)
    result = subprocess.run(["bash", str(REPO / "scripts" / wrapper), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "main_offline_sdpo.py" in result.stdout or "eval_online_sdpo.py" in result.stdout
    assert leaks((result.stdout + result.stderr).encode()) == []
    assert list(tmp_path.iterdir()) == []  # a dry run leaves the disk alone
