"""--overwrite never costs data: every check runs before anything is deleted, only a folder a run of ours
wrote (its run marker) is cleared, only what a run writes is removed, and a user's folder keeps its mode."""
import hashlib
import logging
import os

import pytest

import eval_online_sdpo
from auxiliary.runtime.run_folder import RunFolder, RunFolderError
from reliability_helpers import ERROR_PREFIX, data_dir, last_line, online_args  # noqa: F401 (fixture)

RUN_MARKER = ".sdpo_run.json"  # run_folder.RUN_MARKER, spelled out: users see this name
RUN_FILES = ("metrics.jsonl", "eval_history.json", "config.json", "summary.json", "completions.jsonl")


def snapshot(folder):
    """sha256 of every file of the folder, run.log included (.lock: only while a run holds the folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("bad", [{"model": "/nonexistent/model"}, {"train_jsonl": "/nonexistent.jsonl"},
                                 {"style": "no_such_style"}])
def test_overwrite_with_bad_input_keeps_the_earlier_run_whole(tiny_model_dir, data_dir, tmp_path, capsys, bad):
    out = tmp_path / "run"
    args = dict(train_n=2, eval_every=0, save_checkpoints=True)
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, **args)) == 0
    before = snapshot(out)
    assert all(name in before for name in RUN_FILES) and any(n.startswith("checkpoints/") for n in before)
    capsys.readouterr()
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, overwrite=True, **{**args, **bad})) == 2
    assert last_line(capsys.readouterr().err).startswith(ERROR_PREFIX)
    assert snapshot(out) == before  # not one file lost or changed: run.log has no line of the refused attempt


def test_overwrite_replaces_a_run_of_ours_and_keeps_only_this_runs_log(tiny_model_dir, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # run.log gets the INFO lines, as outside pytest
    out = tmp_path / "run"
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=2, eval_every=0,
                                             save_checkpoints=True)) == 0
    (out / "notes.txt").write_text("mine")  # not a file a run writes: kept
    first_log = (out / "run.log").read_text()
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=1, eval_every=0,
                                             overwrite=True)) == 0
    assert [line for line in (out / "metrics.jsonl").read_text().splitlines()] and not (out / "checkpoints").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / RUN_MARKER).is_file()
    log = (out / "run.log").read_text()
    assert "output dir:" in log and "--overwrite: removed" in log
    assert len(first_log) > 0 and log.count("output dir:") == 1
    assert log.index("output dir:") < log.index("--overwrite: removed")  # the lines before the removal kept


def test_a_refused_overwrite_after_a_started_one_leaves_run_log_alone_and_logs_the_next_run(
        tiny_model_dir, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    args = dict(train_n=1, eval_every=0)
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, **args)) == 0
    before = snapshot(out)
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, overwrite=True, model="/nonexistent",
                                             **args)) == 2
    assert snapshot(out) == before
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, resume=True, train_n=2,
                                             eval_every=0)) == 0
    log = (out / "run.log").read_text()
    assert log.count("output dir:") == 2 and "/nonexistent" not in log  # the first run's and the resumed run's


def test_overwrite_refuses_a_folder_no_run_of_ours_made_and_leaves_it_alone(tmp_path):
    user = tmp_path / "mine"
    (user / "checkpoints").mkdir(parents=True)
    (user / "wandb").mkdir()
    for name in ("config.json", "summary.json", "model.safetensors"):
        (user / name).write_text(name)
    os.chmod(user, 0o755)
    before = snapshot(user)
    for resume, overwrite in ((False, True), (False, False)):
        refusal = rf"holds config.json, summary.json, checkpoints, wandb but not the run marker {RUN_MARKER}"
        with pytest.raises(RunFolderError, match=refusal):
            RunFolder.open(user, resume=resume, overwrite=overwrite)
    assert snapshot(user) == before and {p.name for p in user.iterdir()} == {
        "checkpoints", "wandb", "config.json", "summary.json", "model.safetensors"}
    assert os.stat(user).st_mode & 0o777 == 0o755  # never chmod-ed: not our folder


def forged_markers(tmp_path):
    """Files named like the run marker that are no marker of ours: each must be refused like no marker."""
    real = tmp_path / "a_real_run"
    RunFolder.open(real, resume=False, overwrite=False).close()
    return {"empty": lambda marker: marker.write_text(""),
            "not JSON": lambda marker: marker.write_text("{not json"),
            "another project's": lambda marker: marker.write_text('{"project": "someone-else"}'),
            "a link to a real run's": lambda marker: marker.symlink_to(real / RUN_MARKER)}


@pytest.mark.parametrize("forgery", ["empty", "not JSON", "another project's", "a link to a real run's"])
def test_a_forged_run_marker_does_not_make_a_user_folder_ours(tmp_path, forgery):
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("config.json", "summary.json"):
        (user / name).write_text(name)
    os.chmod(user, 0o755)
    forged_markers(tmp_path)[forgery](user / RUN_MARKER)
    before = snapshot(user)
    with pytest.raises(RunFolderError, match=rf"holds config.json, summary.json but not the run marker {RUN_MARKER}"):
        RunFolder.open(user, resume=False, overwrite=True)
    assert snapshot(user) == before and os.stat(user).st_mode & 0o777 == 0o755


def test_a_forged_marker_in_an_empty_folder_is_replaced_by_ours_not_followed(tmp_path):
    real = tmp_path / "a_real_run"
    RunFolder.open(real, resume=False, overwrite=False).close()
    real_marker = (real / RUN_MARKER).read_bytes()
    user = tmp_path / "mine"
    user.mkdir()
    (user / RUN_MARKER).symlink_to(real / RUN_MARKER)
    RunFolder.open(user, resume=False, overwrite=False).close()
    assert not (user / RUN_MARKER).is_symlink() and (real / RUN_MARKER).read_bytes() == real_marker
    (empty := tmp_path / "empty").mkdir()
    (empty / RUN_MARKER).write_text("")
    RunFolder.open(empty, resume=False, overwrite=False).close()
    assert '"project"' in (empty / RUN_MARKER).read_text()


def test_a_user_folder_without_run_files_keeps_its_mode(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("x")
    os.chmod(user, 0o755)
    RunFolder.open(user, resume=False, overwrite=False).close()
    assert os.stat(user).st_mode & 0o777 == 0o755 and (user / RUN_MARKER).is_file()
    fresh = RunFolder.open(tmp_path / "new", resume=False, overwrite=False)
    assert os.stat(fresh.path).st_mode & 0o777 == 0o700  # a folder the run creates is owner-only
    fresh.close()


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(RunFolderError, match="exclude each other"):
        RunFolder.open(tmp_path / "run", resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()


def test_overwrite_refused_for_a_missing_wandb_keeps_the_earlier_baseline(tiny_model_dir, data_dir, tmp_path,
                                                                          monkeypatch):
    from auxiliary.runtime.wandb_run import WandbSetupError

    def no_wandb(enabled):
        if enabled:
            raise WandbSetupError("--wandb needs the wandb package (pip install wandb)")

    out = tmp_path / "run"
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=1, eval_every=0)) == 0
    before = snapshot(out)
    monkeypatch.setattr(eval_online_sdpo.WandbRun, "require", staticmethod(no_wandb))
    # other evaluation settings: a baseline made before the check would replace baseline_completions.json
    assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=1, eval_every=0, overwrite=True,
                                             eval_max_new_tokens=5, wandb=True)) == 2
    assert snapshot(out) == before
