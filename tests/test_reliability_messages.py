"""Low-severity failures of the third probe: each ends in one line naming what to change (issue 26, 9-13)."""
import os
from types import SimpleNamespace

import pytest

import eval_online_sdpo
from auxiliary.chat.session import ChatError, ChatSession, validate_user_id
from auxiliary.chat.web import WebSetupError, web_credentials
from auxiliary.runtime.run_folder import RunFolder, RunFolderError
from chat_sdpo import ChatConfig, merge_repeated_flag
from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig
from reliability_helpers import ERROR_PREFIX, data_dir, online_args  # noqa: F401 (fixture)


# 9 ------------------------------------------------------------------ an empty --auth_file
def test_an_auth_file_without_logins_is_refused(tmp_path):
    auth = tmp_path / "logins.txt"
    auth.write_text("# nobody yet\n\n")
    os.chmod(auth, 0o600)
    config = SimpleNamespace(auth=None, auth_file=str(auth), host="127.0.0.1")
    with pytest.raises(WebSetupError, match=rf"^--auth_file {auth} holds no USER:PASS line$"):
        web_credentials(config)
    auth.write_text("alice:pw\n")
    assert web_credentials(config) == [("alice", "pw")]


# 10 ----------------------------------------------------------------- message size
def test_a_message_over_max_message_chars_is_refused_before_the_model_sees_it(tmp_path, tiny_tokenizer):
    from auxiliary.runtime.tiny_model import build_tiny_model
    from chat_sdpo import TerminalChat
    from online_sdpo_updater import OnlineSDPOUpdater

    assert ChatConfig().max_message_chars == 20_000
    with pytest.raises(ValueError, match="--max_message_chars must be >= 1"):
        ChatConfig(max_message_chars=0)
    updater = OnlineSDPOUpdater(ChatConfig(model="tiny-test", max_new_tokens=4, lora_r=4, lora_alpha=8),
                                model=build_tiny_model(tiny_tokenizer, seed=0), tokenizer=tiny_tokenizer)
    session = ChatSession(updater, tmp_path / "ann", max_message_chars=50)
    session.load()
    with pytest.raises(ChatError, match="the message has 51 characters, more than --max_message_chars 50"):
        session.send("x" * 51)
    assert session.messages == [] and not session.busy()
    printed = []
    terminal = TerminalChat(session, colour=False, out=SimpleNamespace(write=printed.append, flush=lambda: None))
    terminal.chat("y" * 10_000_000)  # 10 MB: one line, at once
    assert "".join(printed).startswith("[not sent: the message has 10000000 characters") and session.messages == []
    session.send("x" * 50).reply()  # at the limit: answered
    assert len(session.messages) == 2
    session.close(save=False)


# 11 ----------------------------------------------------------------- corrupted run files on --resume
def run_with_results(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    folder.write_config({"sdpo": {"lr": 0.001}, "run": {}})
    folder.write_metrics([{"step": 1}, {"step": 2}])
    folder.write_history([{"step": 0}])
    folder.close()
    return tmp_path / "run"


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n....", r"config.json: not the run's config.json \(not JSON: "),
    (b"[1, 2]", r"config.json: not the run's config.json \(a JSON list, expected an object\)"),
    (b'{"sdpo": 5, "run": {}}', r"config.json: not the run's config.json \(\"sdpo\" is not an object\)"),
])
def test_a_corrupted_config_json_on_resume_is_one_line_naming_it(tmp_path, content, expected):
    out = run_with_results(tmp_path)
    (out / "config.json").write_bytes(content)
    folder = RunFolder.open(out, resume=True, overwrite=False)
    with pytest.raises(RunFolderError, match=rf"^{out}/{expected}"):
        folder.check_resume_config({"sdpo": {"lr": 0.001}, "run": {}}, allow_change=False)
    folder.close()


def test_records_without_a_step_on_resume_name_file_and_line(tmp_path):
    out = run_with_results(tmp_path)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 0.5}\n')
    folder = RunFolder.open(out, resume=True, overwrite=False)
    with pytest.raises(RunFolderError, match=rf"^{out}/metrics.jsonl:2: a record without a whole-number \"step\""):
        folder.truncate_after(1)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "eval_history.json").write_text('{"step": 0}')
    with pytest.raises(RunFolderError, match=r"eval_history.json: not the run's evaluation history \(a JSON dict"):
        folder.truncate_after(1)
    (out / "eval_history.json").write_text('[{"step": 0}]')
    assert folder.truncate_after(1) == ([{"step": 1}], [{"step": 0}])
    folder.close()


# 12 ----------------------------------------------------------------- links in a run folder
@pytest.mark.parametrize("name", ["run.log", "completions.jsonl", "metrics.jsonl", "checkpoints"])
def test_a_link_in_a_run_folder_is_refused_and_its_target_untouched(tmp_path, name):
    out = run_with_results(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("the user's own file\n")
    os.chmod(target, 0o644)
    (out / name).unlink(missing_ok=True) if not (out / name).is_dir() else None
    (out / name).symlink_to(target)
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(RunFolderError, match=rf"^{out / name} is a symbolic link; a run never writes through"):
            RunFolder.open(out, resume=resume, overwrite=overwrite)
    assert target.read_text() == "the user's own file\n" and os.stat(target).st_mode & 0o777 == 0o644


# 13 ----------------------------------------------------------------- messages
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_out_of_range_names_the_flag(seed):
    from auxiliary.runtime.cli import parse_dataclasses

    with pytest.raises(ValueError, match=rf"--seed must be in \[0, 4294967295\], got {seed}"):
        parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), ["--seed", seed])


def test_train_n_0_is_refused_not_an_empty_successful_run():
    with pytest.raises(ValueError, match="--train_n must be >= 1, got 0"):
        OnlineRunConfig(train_n=0)


def test_auth_with_equals_signs_keeps_every_login():
    assert merge_repeated_flag(["--auth=alice:pw1", "--ui", "web", "--auth=bob:pw2"], "--auth") == \
        ["--ui", "web", "--auth", "alice:pw1", "bob:pw2"]


def test_a_user_name_with_a_trailing_newline_is_refused():
    with pytest.raises(ChatError, match="--user_id 'alice\\\\n'"):
        validate_user_id("alice\n")
    assert validate_user_id("alice") == "alice"


def test_ctrl_c_during_setup_is_one_line_and_exit_130(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    from auxiliary.runtime import model_loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_loading, "load_tokenizer", interrupted)  # the first model file setup reads
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"{ERROR_PREFIX} interrupted during setup" and "Traceback" not in err
