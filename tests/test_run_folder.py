"""RunFolder: the rules of an online run's output folder, without a model."""
import json

import pytest

from auxiliary.runtime.io_utils import atomic_write_jsonl
from auxiliary.runtime.run_folder import RunFolder, RunFolderError


def test_a_folder_with_results_needs_resume_or_overwrite(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    folder.write_metrics([{"step": 1}])
    (folder.checkpoint_root / "feedback").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    assert (RunFolder.open(tmp_path / "run", resume=True, overwrite=False) / "metrics.jsonl").exists()
    RunFolder.open(tmp_path / "run", resume=False, overwrite=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not folder.checkpoint_root.exists()


def test_truncate_after_keeps_the_records_up_to_the_step(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    folder.write_metrics([{"step": s} for s in (1, 2, 3)])
    folder.write_history([{"step": s} for s in (0, 2, 3)])
    atomic_write_jsonl(folder / "completions.jsonl", [{"step": s} for s in (1, 2, 3)])
    with open(folder / "completions.jsonl", "a") as handle:
        handle.write('{"step": 4, "cut')  # a kill mid-append
    metrics, history = folder.truncate_after(2)
    assert [r["step"] for r in metrics] == [1, 2] and [r["step"] for r in history] == [0, 2]
    assert [r["step"] for r in folder.read_completions()] == [1, 2]
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_marker_names_a_step_every_arm_has(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    assert folder.checkpoint_marker_step() is None and folder.resume_checkpoints(["feedback"]) == (-1, {})
    folder.checkpoint_path("feedback", 3).mkdir(parents=True)
    folder.write_checkpoint_marker(3, ["feedback", "placebo"])
    assert folder.checkpoint_marker_step() == 3
    assert folder.resume_checkpoints(["feedback"]) == (3, {"feedback": folder.checkpoint_root / "feedback" / "step_000003"})
    with pytest.raises(RunFolderError, match="placebo/step_000003 is missing"):
        folder.resume_checkpoints(["feedback", "placebo"])


def test_baseline_cache_is_used_only_with_the_same_settings(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    assert folder.cached_baseline({"seed": 1}) is None
    folder.save_baseline({"seed": 1}, ["a", "b"])
    assert folder.cached_baseline({"seed": 1}) == ["a", "b"]
    with pytest.raises(RunFolderError, match="made with other settings"):
        folder.cached_baseline({"seed": 2})
