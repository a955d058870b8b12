"""One writer per folder: FolderLock refuses a second holder while the first lives (a real second
process), takes over a dead holder's lock with a warning, and guards the chat and the offline trainer."""
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from auxiliary.runtime.locks import LOCK_NAME, FolderLock, FolderLockError

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from auxiliary.runtime.locks import FolderLock
    with FolderLock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test says so
""")


@pytest.fixture()
def holder_process(tmp_path):
    """A second Python process holding FolderLock(tmp_path / 'run') until its stdin closes."""
    folder = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    assert child.stdout.readline().strip() == "held"
    yield child, folder
    if child.poll() is None:
        child.kill()
        child.wait()


def test_a_live_holder_in_another_process_is_refused_by_name(holder_process):
    child, folder = holder_process
    with pytest.raises(FolderLockError) as caught:
        FolderLock(folder).acquire()
    message = str(caught.value)
    assert f"PID {child.pid} on {socket.gethostname()}" in message and "\n" not in message
    child.stdin.close()  # the holder leaves the with-block: the lock file goes with it
    assert child.wait(timeout=30) == 0
    assert not (folder / LOCK_NAME).exists()
    with FolderLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_killed_holders_lock_is_taken_over_with_a_warning(holder_process, caplog):
    child, folder = holder_process
    child.kill()  # no cleanup: the lock file stays, naming a dead PID
    child.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == child.pid
    with caplog.at_level(logging.WARNING):
        with FolderLock(folder):
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"stale lock (PID {child.pid}" in caplog.text
    assert not (folder / LOCK_NAME).exists()


def test_same_process_twice_and_other_host_are_refused(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(FolderLockError, match=f"PID {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(FolderLockError, match="PID 1 on host elsewhere.example"):
        FolderLock(tmp_path).acquire()


def test_lock_file_is_owner_only_and_release_keeps_a_foreign_lock(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    assert os.stat(tmp_path / LOCK_NAME).st_mode & 0o777 == 0o600
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid() + 1, "host": socket.gethostname()}))
    lock.release()  # not ours any more (taken over): left alone
    assert (tmp_path / LOCK_NAME).exists()


def test_chat_user_folder_is_locked_while_a_session_is_open(tmp_path, tiny_tokenizer):
    from auxiliary.chat.session import ChatSession
    from auxiliary.runtime.tiny_model import build_tiny_model
    from chat_sdpo import ChatConfig
    from online_sdpo_updater import OnlineSDPOUpdater

    def session():
        config = ChatConfig(model="tiny-test", max_new_tokens=4, temperature=0.0, lora_r=4, lora_alpha=8)
        updater = OnlineSDPOUpdater(config, model=build_tiny_model(tiny_tokenizer, seed=0), tokenizer=tiny_tokenizer)
        return ChatSession(updater, tmp_path / "alice")

    first = session()
    first.load()
    assert os.stat(tmp_path / "alice").st_mode & 0o777 == 0o700
    second = session()
    with pytest.raises(FolderLockError, match="alice is in use by PID"):
        second.load()
    first.close()
    assert second.load().startswith("loaded adapter of user 'alice'")
    second.close(save=False)
    assert not (tmp_path / "alice" / LOCK_NAME).exists()


def test_offline_trainer_refuses_a_locked_output_folder(tmp_path, holder_process):
    from offline_sdpo.main_offline_sdpo import main

    child, folder = holder_process
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "completion": "hello",
                                "user_response": "shorter"}) + "\n")
    with pytest.raises(SystemExit, match=f"error: .*run is in use by PID {child.pid}"):
        main(["--train_jsonl", str(data), "--output_dir", str(folder), "--base_model", "tiny-random"])


def test_tools_started_together_convert_the_smollm2_gguf_once(tmp_path, monkeypatch):
    """The GGUF conversion costs ~40 s of CPU: a second tool that asks for the model while the first converts waits
    for the first's folder instead of converting it again (docs/first_hour.md's commands run two at a time)."""
    import threading
    import time

    from auxiliary.runtime import model_loading

    calls = []

    def slow_conversion(target):
        calls.append(target)
        time.sleep(0.5)  # both callers are past the "not converted yet" check before the first one publishes
        target.mkdir()
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(model_loading, "_materialise_smollm2", slow_conversion)
    paths = []
    callers = [threading.Thread(target=lambda: paths.append(
        model_loading.resolve_model_path(model_loading.SMOLLM2_NAME, cache_dir=tmp_path))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert calls == [tmp_path / model_loading.SMOLLM2_NAME]
    assert paths == [str(tmp_path / model_loading.SMOLLM2_NAME)] * 2
