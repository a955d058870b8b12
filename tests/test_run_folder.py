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
    with pytest.raises(RunFolderError, match=r"is in use by PID \d+"):  # one writer: the first still holds it
        RunFolder.open(tmp_path / "run", resume=True, overwrite=False)
    folder.close()
    resumed = RunFolder.open(tmp_path / "run", resume=True, overwrite=False)
    assert (resumed / "metrics.jsonl").exists() and (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    resumed.close()
    replacing = RunFolder.open(tmp_path / "run", resume=False, overwrite=True)
    assert (replacing / "metrics.jsonl").exists()  # nothing goes before the entry point's checks have passed
    replacing.clear_earlier_results()
    replacing.close()
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
    for step in (2, 3):
        fake_checkpoint(folder.checkpoint_path("feedback", step))
    folder.write_checkpoint_marker(3, ["feedback", "placebo"])
    assert folder.checkpoint_marker_step() == 3
    expected = (3, {"feedback": folder.checkpoint_root / "feedback" / "step_000003"})
    assert folder.resume_checkpoints(["feedback"]) == expected
    with pytest.raises(RunFolderError, match="placebo/step_000003 is missing"):
        folder.resume_checkpoints(["feedback", "placebo"])


def fake_checkpoint(path):
    """A step folder the updater would list and verify: a state file and a manifest of its files."""
    from online_sdpo_updater import write_manifest

    path.mkdir(parents=True)
    (path / "updater_state.json").write_text(json.dumps({"step": int(path.name.split("_")[1])}))
    for name in ("optimizer.pt", "rng.pt", "rng.json"):
        (path / name).write_bytes(b"0123456789")
    write_manifest(path)


def test_resume_falls_back_to_the_newest_step_intact_in_every_arm(tmp_path, caplog):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    for arm in ("feedback", "placebo"):
        for step in (1, 2, 3):
            fake_checkpoint(folder.checkpoint_path(arm, step))
    folder.write_checkpoint_marker(3, ["feedback", "placebo"])
    (folder.checkpoint_path("placebo", 3) / "optimizer.pt").write_bytes(b"01234")  # truncated
    assert folder.resume_checkpoints(["feedback", "placebo"])[0] == 2
    assert "optimizer.pt: 5 bytes, the manifest says 10" in caplog.text and "falling back to step 2" in caplog.text
    (folder.checkpoint_root / "latest.json").write_text("{not json")  # a corrupted marker: newest intact step
    assert folder.resume_checkpoints(["feedback", "placebo"])[0] == 2
    (folder.checkpoint_path("feedback", 2) / "manifest.json").unlink()
    (folder.checkpoint_path("feedback", 1) / "optimizer.pt").unlink()
    with pytest.raises(RunFolderError, match=r"no intact checkpoint in .*checkpoints: .*"):
        folder.resume_checkpoints(["feedback", "placebo"])


def test_a_resume_that_changes_the_experiment_is_refused_unless_allowed(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    first = {"sdpo": {"model": "a", "lr": 1e-5}, "run": {"style": "concise", "resume": False, "wandb": False}}
    folder.write_config(first)
    resumed = {"sdpo": {"model": "b", "lr": 1e-5}, "run": {"style": "detailed", "resume": True, "wandb": True}}
    with pytest.raises(RunFolderError, match=r"change the experiment \(model: 'a' -> 'b'; style: 'concise' -> "
                                             r"'detailed'\); pass --allow_config_change"):
        folder.check_resume_config(resumed, allow_change=False)
    folder.check_resume_config({**first, "run": {**first["run"], "resume": True}}, allow_change=False)  # neutral
    folder.check_resume_config(resumed, allow_change=True)
    folder.write_config(resumed, resume_step=7)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["sdpo"]["model"] == "b" and saved["history"][0]["resumed_after_step"] == 7
    assert saved["history"][0]["changed"] == {"model": ["a", "b"], "style": ["concise", "detailed"]}
    folder.write_config(resumed, resume_step=9)  # a later resume without changes keeps the history
    assert len(json.loads((folder / "config.json").read_text())["history"]) == 1


def test_baseline_cache_is_used_only_with_the_same_settings(tmp_path):
    folder = RunFolder.open(tmp_path / "run", resume=False, overwrite=False)
    assert folder.cached_baseline({"seed": 1}) is None
    folder.save_baseline({"seed": 1}, ["a", "b"])
    assert folder.cached_baseline({"seed": 1}) == ["a", "b"]
    with pytest.raises(RunFolderError, match="made with other settings"):
        folder.cached_baseline({"seed": 2})
