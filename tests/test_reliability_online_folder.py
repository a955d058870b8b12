"""The online run folder: one writer, resume that refuses to mix settings, a resumable SIGTERM,
the final error in run.log, owner-only files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import eval_online_sdpo
from reliability_helpers import (ERROR_PREFIX, clean_env, data_dir, last_line, online_args,  # noqa: F401 (fixture)
                                 read_jsonl, start_cli)


def test_a_second_run_on_a_live_runs_folder_is_refused_naming_the_holder(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                         caplog):
    out = tmp_path / "run"
    out.mkdir()
    mode = os.stat(out).st_mode & 0o777
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out)) == 2
        error = last_line(capsys.readouterr().err)
        assert error.startswith(ERROR_PREFIX) and f"in use by PID {holder.pid}" in error
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale, taken over with a warning, and released at the end
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=2, eval_every=0)) == 0
    assert not (out / ".lock").exists() and "stale" in caplog.text
    # a folder made by the user keeps its mode (a folder the run creates is 0700); run.log is owner-only
    assert os.stat(out).st_mode & 0o777 == mode and os.stat(out / "run.log").st_mode & 0o777 == 0o600


def test_resume_with_another_model_or_lr_is_refused_in_one_line_before_loading(tiny_model_dir, data_dir, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    args = dict(train_n=2, eval_every=0, save_checkpoints=True)
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, **args)) == 0
    capsys.readouterr()
    other_model = tmp_path / "no_such_model"  # never loaded: the refusal comes first
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, resume=True, model=other_model,
                                             lr=5e-4, train_n=4,
                                             **{k: v for k, v in args.items() if k != "train_n"})) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "change the experiment" in error[0] and "lr: 0.001 -> 0.0005" in error[0]
    assert f"model: '{tiny_model_dir}' -> '{other_model}'" in error[0] and "--allow_config_change" in error[0]
    assert "change the experiment" in (out / "run.log").read_text()  # the final error is in run.log too
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]  # nothing lost
    # allowed: the run goes on and config.json keeps what changed, and after which step
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, resume=True, lr=5e-4, train_n=4,
                                             allow_config_change=True, eval_every=0, save_checkpoints=True)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["sdpo"]["lr"] == 5e-4 and config["history"][0]["resumed_after_step"] == 2
    assert config["history"][0]["changed"] == {"lr": [1e-3, 5e-4]}
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_says_the_run_can_be_resumed(tiny_model_dir, data_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "child.log"
    child = start_cli(online_args(tiny_model_dir, data_dir, out, train_n=20, eval_every=0, save_checkpoints=True),
                      clean_env(), log_path=log)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 143
    text = log.read_text()
    assert "terminated (SIGTERM)" in last_line(text) and "the run can be resumed" in last_line(text)
    assert "terminated (SIGTERM)" in (out / "run.log").read_text() and not (out / ".lock").exists()
