"""A model that does not load leaves nothing half-written (issue #29): what can be checked before the output folder
exists is (the path exists and is a model folder, config.json reads, a hub id is in the cache when
HF_HUB_OFFLINE=1: model_loading.check_loadable), so no folder is made; a load that fails later (weights that are not
weights) removes the folder this run created while it holds only what this run wrote (its run marker, run.log), and
never a folder that was there before or anything a user put in it. Always one line and exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reliability_helpers import (ERROR_PREFIX, REPO, data_dir, last_line, main_block, online_args,  # noqa: F401
                                 run_like_a_child)

OFFLINE_SCRIPT = REPO / "offline_sdpo" / "main_offline_sdpo.py"
OFFLINE_DATA = REPO / "data" / "samples" / "interactions.jsonl"
HUB_ID = "nobody-h29/no-such-model"  # never in the cache; HF_HUB_OFFLINE=1 (conftest) keeps it off the network


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """missing: no such path; not_a_model: a folder without config.json; broken: config.json fine, weights not."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "not_a_model").mkdir()
    (folder / "not_a_model" / "notes.txt").write_text("mine")
    shutil.copytree(tiny_model_dir, folder / "broken")
    (folder / "broken" / "model.safetensors").write_text("not a safetensors file")
    return {"missing": str(folder / "missing"), "not_a_model": str(folder / "not_a_model"), "hub": HUB_ID,
            "broken": str(folder / "broken")}


EXPECTED = {"missing": "does not exist", "not_a_model": "has no config.json", "hub": "is a hub id",
            "broken": "could not load model"}


def one_clear_line(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in last_line(result.stderr), result.stderr[-2000:]
    assert "error:" in last_line(result.stderr) and "Traceback" not in result.stderr


def offline_argv(model: str, out: Path) -> list[str]:
    return ["--model", model, "--train_jsonl", str(OFFLINE_DATA), "--output_dir", str(out), "--max_steps", "1",
            "--batch_size", "2", "--grad_accum", "1"]


@pytest.mark.parametrize("kind", ["missing", "not_a_model", "hub", "broken"])
def test_online_run_with_a_model_that_does_not_load_leaves_no_folder(kind, models, data_dir, tmp_path, monkeypatch,
                                                                       capfd):
    import eval_online_sdpo

    out = tmp_path / "new" / "run"  # two folders the run would create
    argv = online_args(models[kind], data_dir, out)
    result = run_like_a_child(eval_online_sdpo.main, argv, monkeypatch, capfd)
    one_clear_line(result, EXPECTED[kind])
    assert last_line(result.stderr).startswith(ERROR_PREFIX)
    assert not (tmp_path / "new").exists()  # neither the run's folder nor the parent it made
    if kind == "broken":  # this one fails only once the folder was made: it went again
        assert "output dir:" in result.stderr


def test_online_setup_failure_keeps_a_folder_that_was_there_and_the_users_files(models, data_dir, tmp_path,
                                                                                  monkeypatch, capfd):
    import eval_online_sdpo

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_like_a_child(eval_online_sdpo.main, online_args(models["broken"], data_dir, out), monkeypatch,
                              capfd)
    one_clear_line(result, EXPECTED["broken"])
    assert (out / "notes.txt").read_text() == "mine"


def test_online_bad_data_after_the_folder_opened_removes_the_folder(models, tiny_model_dir, tmp_path, monkeypatch,
                                                                      capfd):
    import eval_online_sdpo

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
    (data / "validation.jsonl").write_text('{"prompt": "fine"}\n')
    out = tmp_path / "run"
    result = run_like_a_child(eval_online_sdpo.main, online_args(tiny_model_dir, data, out), monkeypatch, capfd)
    one_clear_line(result, "malformed JSON")
    assert "output dir:" in result.stderr and not out.exists()


@pytest.mark.parametrize("kind", ["missing", "hub", "broken"])
def test_offline_trainer_with_a_model_that_does_not_load_leaves_no_folder(kind, models, tmp_path, monkeypatch,
                                                                          capfd):
    out = tmp_path / "new" / "offline"
    result = run_like_a_child(main_block(OFFLINE_SCRIPT), offline_argv(models[kind], out), monkeypatch, capfd)
    one_clear_line(result, EXPECTED[kind])
    assert not (tmp_path / "new").exists()
    if kind == "broken":  # it got as far as reading the records, after the folder was made
        assert "24 records read" in result.stdout + result.stderr


def test_offline_trainer_keeps_a_folder_that_was_there(models, tmp_path, monkeypatch, capfd):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_like_a_child(main_block(OFFLINE_SCRIPT), offline_argv(models["broken"], out), monkeypatch, capfd)
    one_clear_line(result, EXPECTED["broken"])
    assert (out / "notes.txt").read_text() == "mine"


def test_chat_with_a_model_that_does_not_load_leaves_no_adapters_folder(models, tmp_path, monkeypatch, capfd):
    import chat_sdpo

    adapters = tmp_path / "new" / "adapters"
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    result = run_like_a_child(chat_sdpo.main, ["--model", models["broken"], "--adapters_dir", str(adapters)],
                              monkeypatch, capfd)
    one_clear_line(result, EXPECTED["broken"])
    assert not (tmp_path / "new").exists()


def test_eval_tools_with_a_model_that_does_not_load_leave_no_folder(models, tiny_model_dir, tmp_path, monkeypatch,
                                                                     capfd):
    import nltk

    from auxiliary import eval_benchmarks, eval_checkpoints, sdpo_signal_analysis

    monkeypatch.setenv("NLTK_DATA", "")  # --nltk_data sets both: restored after the test
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    val = REPO / "data" / "samples" / "validation.jsonl"
    runs = {
        "eval_checkpoints": (eval_checkpoints.main, [
            "--checkpoints", str(tiny_model_dir), "--baseline_model", models["broken"], "--judge", "rule",
            "--eval_styles", "concise", "--val_jsonl", str(val), "--eval_n", "1", "--max_new_tokens", "2"]),
        "signals": (sdpo_signal_analysis.main, ["--model", models["broken"], "--n_cases", "1"]),
        "benchmarks": (eval_benchmarks.main, ["--baseline_model", models["missing"], "--tasks", "ifeval",
                                              "--nltk_data", str(REPO / "tests" / "fixtures" / "benchmarks" /
                                                                 "nltk_data"), "--limit", "1"]),
    }
    for name, (entry, argv) in runs.items():
        out = tmp_path / name / "out"
        result = run_like_a_child(entry, argv + ["--output_dir", str(out)], monkeypatch, capfd)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "model" in last_line(result.stderr), (name, result.stderr)
        assert "NLTK" not in last_line(result.stderr)
        assert not (tmp_path / name).exists(), name


def test_remove_unstarted_removes_only_what_this_run_made(tmp_path):
    from auxiliary.runtime.io_utils import folders_to_create
    from auxiliary.runtime.run_folder import RUN_MARKER, remove_unstarted, write_run_marker

    def made(path: Path) -> list[Path]:
        created = folders_to_create(path)
        path.mkdir(parents=True)
        write_run_marker(path, "test")
        (path / "run.log").write_text("a line")
        return created

    out = tmp_path / "a" / "b"
    created = made(out)
    assert created == [out, tmp_path / "a"]
    assert remove_unstarted(created, ("run.log",)) and not (tmp_path / "a").exists() and tmp_path.exists()

    out = tmp_path / "c" / "d"  # a user's file written meanwhile: everything stays
    created = made(out)
    (out / "notes.txt").write_text("mine")
    assert not remove_unstarted(created, ("run.log",)) and (out / "notes.txt").exists() and (out / RUN_MARKER).exists()

    out = tmp_path / "e"  # run.log is not one of this run's files here: stays
    created = made(out)
    assert not remove_unstarted(created, ()) and (out / "run.log").exists()

    out = tmp_path / "f"  # a marker that is not ours
    created = folders_to_create(out)
    out.mkdir()
    (out / RUN_MARKER).write_text(json.dumps({"project": "someone else"}))
    assert not remove_unstarted(created, ()) and out.exists()

    sibling = tmp_path / "g" / "h"  # a parent that holds something else stays
    created = made(sibling)
    (tmp_path / "g" / "other").write_text("mine")
    assert remove_unstarted(created, ("run.log",)) and not sibling.exists() and (tmp_path / "g" / "other").exists()

    assert folders_to_create(tmp_path) == [] and not remove_unstarted([], ())
