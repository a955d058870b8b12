"""The chat keeps a user's learning: SIGTERM / SIGHUP save, /undo and /reset restore the whole training
state, web commands racing a /quit, and the web server's limits (logins, message size)."""
import builtins
import json
import os
import signal

import pytest
import torch

import chat_sdpo
from test_chat_session import chat, make_session


def training_state(session):
    updater = session.updater
    return {"step": updater.step, "last_epoch": updater.scheduler.last_epoch,
            "lr": [group["lr"] for group in updater.optimizer.param_groups],
            "scheduler": json.dumps(updater.scheduler.state_dict(), sort_keys=True, default=str)}


def test_undo_and_reset_restore_the_lr_schedule_with_the_weights(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer, lr_scheduler="linear", scheduler_steps=10, teacher="ema")
    states = [training_state(session)]
    teachers = [session.updater.teacher.state_dict()]
    chat(session, "Hello there")
    for text in ("Shorter please.", "More formal please.", "No lists please."):
        chat(session, text)
        states.append(training_state(session))
        teachers.append(session.updater.teacher.state_dict())
    assert [s["last_epoch"] for s in states] == [0, 1, 2, 3] and states[1]["lr"] != states[3]["lr"]
    session.undo()
    session.undo()
    assert training_state(session) == states[1]  # step 1, scheduler at 1, the lr of step 1
    assert all(torch.equal(a, b) for a, b in zip(teachers[1].values(), session.updater.teacher.state_dict().values()))
    session.reset()
    assert training_state(session) == states[0]
    session.undo()  # takes the reset back
    assert training_state(session) == states[1]
    path = session.save()
    assert json.loads((path / "updater_state.json").read_text())["scheduler"]["last_epoch"] == 1
    session.close(save=False)


def scripted_input(lines, then_signal):
    """builtins.input replacement: the lines in turn, then the signal sent to this process (as `kill PID`)."""
    queue = list(lines)

    def fake_input(prompt=""):
        if queue:
            return queue.pop(0)
        os.kill(os.getpid(), then_signal)
        raise AssertionError("the signal should have ended the chat")  # pragma: no cover
    return fake_input


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_saves_the_adapter_and_the_log(tmp_path, tiny_model_dir, monkeypatch, capsys, signum):
    monkeypatch.setattr(builtins, "input", scripted_input(["Hello there", "Shorter please."], signum))
    argv = ["--model", str(tiny_model_dir), "--adapters_dir", str(tmp_path), "--user_id", "ann", "--max_new_tokens",
            "6", "--temperature", "0", "--lora_r", "4", "--lora_alpha", "8", "--lr", "1e-2", "--color", "never"]
    before = signal.getsignal(signum)
    assert chat_sdpo.main(argv) == 128 + signum
    assert signal.getsignal(signum) == before  # the handler is the chat's only while it runs
    out = capsys.readouterr().out
    assert f"{signal.Signals(signum).name}: saving before leaving" in out and "saved to" in out
    state = json.loads((tmp_path / "ann" / "adapter" / "updater_state.json").read_text())
    assert state["step"] == 1 and state["extra"]["updates_applied"] == 1  # the update since the start is kept
    assert len((tmp_path / "ann" / "interactions.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "ann" / ".lock").exists()


def test_a_quit_racing_a_save_or_undo_of_the_same_user_never_meets_its_own_lock(tmp_path, tiny_tokenizer):
    """The web router: /quit closes (and saves) a user's session while their /save or /undo comes in. The
    command waits for the close to end, then goes to the user's next session, which loads the saved adapter."""
    import threading
    import time
    from types import SimpleNamespace

    from auxiliary.chat.web import SessionRouter
    from online_sdpo_updater import OnlineSDPOUpdater

    saving = threading.Event()
    real_save = OnlineSDPOUpdater.save_checkpoint

    def slow_save(self, *args, **kwargs):  # holds the folder lock a while, as a big adapter's save does
        saving.set()
        time.sleep(0.3)
        return real_save(self, *args, **kwargs)

    opened = []

    def open_session(user):
        opened.append(make_session(tmp_path, tiny_tokenizer, user=user))
        opened[-1].updater.save_checkpoint = slow_save.__get__(opened[-1].updater)
        return opened[-1]

    router = SessionRouter(open_session)
    me = SimpleNamespace(username="gil")
    first = router.session_for(me)
    chat(first, "Hello there")
    chat(first, "Shorter please.")
    for command in ("save", "undo"):
        saving.clear()
        quitting = threading.Thread(target=router.close_user, args=("gil",))
        quitting.start()
        assert saving.wait(30)  # the /quit is saving: its session holds the folder lock now
        answer = getattr(router.session_for(me), command)()
        quitting.join()
        assert opened[-2].closed and not opened[-1].closed and router.session_for(me) is opened[-1]
        if command == "save":
            assert str(answer).endswith("gil/adapter")
            assert opened[-1].updates_applied == 1  # the new session loaded what the /quit saved
        else:
            assert answer.startswith("nothing to undo")  # the undo history ended with the closed session
    # a session closed between routing and the command: the command goes to the next session
    calls = []

    def save_after_a_quit(session):
        calls.append(session)
        if len(calls) == 1:
            router.close_user("gil")  # the /quit lands between routing and the command
        return session.save()

    assert str(router.call(me, save_after_a_quit)).endswith("gil/adapter")
    assert len(calls) == 2 and calls[0].closed and not calls[1].closed
    router.close_all()
    assert not (tmp_path / "gil" / ".lock").exists()


def test_a_full_disk_on_save_is_one_line_and_the_chat_goes_on(tmp_path, tiny_tokenizer):
    import errno
    from types import SimpleNamespace

    from chat_sdpo import TerminalChat

    session = make_session(tmp_path, tiny_tokenizer, user="hal")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hal" / "adapter"))

    session.updater.save_checkpoint = full
    printed = []
    terminal = TerminalChat(session, colour=False, out=SimpleNamespace(write=printed.append, flush=lambda: None))
    terminal.command("/save")
    assert "".join(printed) == f"error: cannot write {tmp_path / 'hal' / 'adapter'}: No space left on device " \
                               "(the disk is full: free space or choose another output folder)\n"
    session.close(save=False)


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_while_the_web_server_starts_saves_the_session_and_exits_143(tmp_path, tiny_model_dir, monkeypatch,
                                                                            capsys):
    gradio = pytest.importorskip("gradio")
    real_launch = gradio.Blocks.launch

    def launch_after_a_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # `kill PID` while the server starts
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(gradio.Blocks, "launch", launch_after_a_sigterm)
    argv = ["--ui", "web", "--port", str(free_port()), "--model", str(tiny_model_dir), "--adapters_dir",
            str(tmp_path), "--user_id", "ann", "--lora_r", "4", "--lora_alpha", "8"]
    before = signal.getsignal(signal.SIGTERM)
    assert chat_sdpo.main(argv) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    out = capsys.readouterr().out
    assert "SIGTERM: saving every open session before leaving" in out
    assert f"saved to {tmp_path / 'ann' / 'adapter'}" in out
    assert (tmp_path / "ann" / "adapter" / "updater_state.json").is_file() and not (tmp_path / "ann" / ".lock").exists()


def test_sigterm_while_the_model_loads_is_one_line_and_exit_143(tmp_path, tiny_model_dir, monkeypatch, capsys):
    real_build = chat_sdpo.build_session

    def build_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build(*args, **kwargs)

    class DefaultActionWouldKill(Exception):
        pass

    def guard(signum, frame):  # stands in for the default action, which would end pytest itself
        raise DefaultActionWouldKill

    monkeypatch.setattr(chat_sdpo, "build_session", build_after_a_sigterm)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        code = chat_sdpo.main(["--model", str(tiny_model_dir), "--adapters_dir", str(tmp_path), "--user_id", "ann"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["SIGTERM while loading: nothing learned yet, nothing to save"]
    assert not (tmp_path / "ann" / "adapter").exists()
