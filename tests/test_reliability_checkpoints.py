"""Checkpoints are trusted only when intact and never unpickled: manifest sizes and sha256,
fallback to the newest intact checkpoint, crash-safe replacement, a planted pickle that must
not run, owner-only folders and logs."""
import json
import logging
import os
import stat

import pytest
import torch

from auxiliary.runtime.checkpoints import (CheckpointError, latest_intact_checkpoint, list_checkpoints,
                                           read_latest_marker, verify_checkpoint)
from auxiliary.runtime.io_utils import (append_jsonl, old_path, partial_path, private_dir, recover_folder,
                                        replace_folder)
from auxiliary.runtime.tiny_model import build_tiny_model
from online_sdpo_updater import OnlineSDPOUpdater
from reliability_helpers import data_dir, tiny_updater  # noqa: F401 (data_dir: a fixture)

MESSAGES = [{"role": "user", "content": "Write a short email to my manager."}]


def make_updater(tokenizer, **overrides):
    return tiny_updater(tokenizer, **{"lr": 1e-3, "max_new_tokens": 6, "loss_mode": "simple_signal", **overrides})


@pytest.fixture()
def three_checkpoints(tiny_tokenizer, tmp_path):
    updater = make_updater(tiny_tokenizer, max_checkpoints=0)  # keep all three
    reply = updater.generate([MESSAGES], seed=1)[0]
    folder = tmp_path / "checkpoints"
    for _ in range(3):
        updater.train_step(MESSAGES, reply.ids, "Be brief.")
        updater.save_checkpoint(folder / f"step_{updater.step:06d}")
    return updater, folder


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_manifest_lists_every_file_with_size_and_checksum(three_checkpoints):
    _, folder = three_checkpoints
    newest = folder / "step_000003"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == on_disk and {"optimizer.pt", "rng.pt", "rng.json", "model/model.safetensors"} <= on_disk
    assert manifest["rng.pt"]["size"] == (newest / "rng.pt").stat().st_size
    assert len(manifest["rng.pt"]["sha256"]) == 64
    verify_checkpoint(newest)  # intact: no error


def test_truncated_weights_missing_optimizer_and_corrupt_manifest_are_detected(three_checkpoints):
    _, folder = three_checkpoints
    weights = folder / "step_000003" / "model" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated"):
        verify_checkpoint(folder / "step_000003")
    (folder / "step_000002" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_000002/optimizer\.pt: missing"):
        verify_checkpoint(folder / "step_000002")
    (folder / "step_000001" / "manifest.json").write_text('{"files": {"rng.pt": ')
    with pytest.raises(CheckpointError, match=r"step_000001/manifest\.json: corrupted"):
        verify_checkpoint(folder / "step_000001")


def test_same_size_corruption_is_caught_by_the_checksum(three_checkpoints):
    updater, folder = three_checkpoints
    state = folder / "step_000003" / "updater_state.json"
    text = state.read_text()
    state.write_text(text.replace('"step": 3', '"step": 9'))
    with pytest.raises(CheckpointError, match="updater_state.json: checksum differs"):
        updater.load_checkpoint(folder / "step_000003")
    assert updater.step == 3  # nothing was loaded


def test_corrupted_latest_marker_is_named(tmp_path):
    marker = tmp_path / "latest.json"
    assert read_latest_marker(marker) is None
    marker.write_text('{"step": 4, "arms": ["feedback"]}')
    assert read_latest_marker(marker) == 4
    for bad in ('{"step": 4', '{"step": "four"}', '{"arms": []}', ""):
        marker.write_text(bad)
        with pytest.raises(CheckpointError, match="latest.json: corrupted checkpoint marker"):
            read_latest_marker(marker)


def test_fallback_to_the_newest_intact_checkpoint_with_a_warning(three_checkpoints, caplog):
    _, folder = three_checkpoints
    assert latest_intact_checkpoint(folder) == folder / "step_000003"
    weights = folder / "step_000003" / "model" / "model.safetensors"
    os.truncate(weights, 100)
    with caplog.at_level(logging.WARNING):
        assert latest_intact_checkpoint(folder) == folder / "step_000002"
    assert "step_000003/model/model.safetensors" in caplog.text and "falling back to" in caplog.text
    (folder / "step_000002" / "optimizer.pt").unlink()
    (folder / "step_000001" / "manifest.json").write_text("garbage")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step_000003/model/model\.safetensors"):
        latest_intact_checkpoint(folder)
    assert latest_intact_checkpoint(folder / "empty") is None


def test_resume_from_the_fallback_restores_its_step(three_checkpoints, tiny_tokenizer):
    _, folder = three_checkpoints
    os.truncate(folder / "step_000003" / "optimizer.pt", 5)
    resumed = make_updater(tiny_tokenizer)
    resumed.load_checkpoint(latest_intact_checkpoint(folder))
    assert resumed.step == 2


def test_crash_between_the_renames_keeps_a_complete_folder(three_checkpoints, tiny_tokenizer):
    """The four steps of a replacement, stopped after each: load always finds the old or the new one."""
    updater, folder = three_checkpoints
    target = folder / "step_000003"

    def fresh_partial(step):
        updater.step = step
        partial = partial_path(target)
        updater.save_checkpoint(folder / "scratch")
        (folder / "scratch").rename(partial)
        return partial

    def step_of(path):
        probe = make_updater(tiny_tokenizer)
        probe.load_checkpoint(path)
        return probe.step

    # crash while the new one is written: a leftover .partial, the old folder is still the one
    fresh_partial(7)
    assert step_of(target) == 3 and not partial_path(target).exists()
    # crash after renaming the old one aside, before the new one is renamed in: the old comes back
    partial = fresh_partial(7)
    target.rename(old_path(target))
    assert not target.exists()
    assert list_checkpoints(folder)[-1].name == "step_000002"  # .old / .partial are never listed as complete
    assert "restored step_000003 from step_000003.old" in recover_folder(target)
    assert step_of(target) == 3 and not partial.exists()
    # crash after the new one is in place, before the old one is deleted: the new one stays
    partial = fresh_partial(7)
    target.rename(old_path(target))
    partial.rename(target)
    assert step_of(target) == 7 and not old_path(target).exists()
    # latest_intact_checkpoint repairs a whole folder of leftovers the same way
    target.rename(old_path(target))
    assert latest_intact_checkpoint(folder) == target and step_of(target) == 7


def test_replace_folder_swaps_contents(tmp_path):
    target, partial = tmp_path / "adapter", tmp_path / "adapter.partial"
    target.mkdir()
    (target / "weights").write_text("old")
    partial.mkdir()
    (partial / "weights").write_text("new")
    replace_folder(partial, target)
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


class PlantedPayload:
    """Unpickling this writes a marker file: what a planted rng.pt / optimizer.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _write_marker(path):
    with open(path, "w") as handle:
        handle.write("code ran")
    return {}


@pytest.mark.parametrize("planted", ["rng.pt", "optimizer.pt"])
def test_a_planted_pickle_is_refused_without_running(three_checkpoints, tiny_tokenizer, tmp_path, planted):
    """The checkpoint's manifest is rewritten to match, as an attacker who can write the folder would."""
    from online_sdpo_updater import write_manifest

    _, folder = three_checkpoints
    checkpoint = folder / "step_000003"
    marker = tmp_path / "marker"
    torch.save(PlantedPayload(marker), checkpoint / planted)
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    resumed = make_updater(tiny_tokenizer)
    with pytest.raises(CheckpointError, match=f"{planted}: refusing to load"):
        resumed.load_checkpoint(checkpoint)
    assert not marker.exists()


def test_checkpoint_and_log_files_are_owner_only(three_checkpoints, tmp_path):
    _, folder = three_checkpoints
    assert mode(folder) == 0o700 and mode(folder / "step_000003") == 0o700
    nested = private_dir(tmp_path / "a" / "b")
    assert mode(tmp_path / "a") == 0o700 and mode(nested) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    private_dir(loose)
    assert mode(loose) == 0o700  # an existing folder of ours is tightened
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"a": 1}, private=True)
    append_jsonl(log, {"a": 2}, private=True)
    assert mode(log) == 0o600 and len(log.read_text().splitlines()) == 2


def test_a_folder_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(PermissionError, match="belongs to user id"):
        private_dir(tmp_path)


def test_chat_load_never_takes_an_interrupted_save_for_a_new_user(tmp_path, tiny_tokenizer):
    """Crash between the renames of an adapter save: the next chat restores the old adapter
    (not 'new user'), and deletes the leftover .partial."""
    from auxiliary.chat.session import ChatSession
    from chat_sdpo import ChatConfig

    def session():
        config = ChatConfig(model="tiny-test", max_new_tokens=4, temperature=0.0, lora_r=4, lora_alpha=8, lr=1e-2)
        updater = OnlineSDPOUpdater(config, model=build_tiny_model(tiny_tokenizer, seed=0), tokenizer=tiny_tokenizer)
        return ChatSession(updater, tmp_path / "alice", log_interactions=False)

    first = session()
    first.load()
    for text in ("Hello", "Be concise."):
        first.send(text).turn_future.result()
    adapter = first.close()
    adapter.rename(old_path(adapter))
    partial_path(adapter).mkdir()
    (partial_path(adapter) / "half-written").write_text("x")
    again = session()
    loaded = again.load()
    assert loaded.startswith("loaded adapter of user 'alice'") and "(1 updates so far" in loaded
    assert "restored adapter from adapter.old" in loaded
    assert not partial_path(adapter).exists() and not old_path(adapter).exists()
    assert os.stat(adapter).st_mode & 0o777 == 0o700
    again.close(save=False)


@pytest.mark.parametrize("limit", [100_000, 600_000])  # safetensors fails first / torch.save of the optimizer
def test_a_full_disk_while_checkpointing_is_one_cannot_write_line_and_keeps_the_last_checkpoint(
        tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch, limit):
    import resource

    import eval_online_sdpo
    from online_sdpo_updater import OnlineSDPOUpdater, verify_checkpoint
    from reliability_helpers import ERROR_PREFIX, last_line, online_args

    original, calls = OnlineSDPOUpdater.save_checkpoint, []

    def save_with_a_file_size_limit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return original(self, *args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # as `ulimit -f` would, for this save only
        try:
            return original(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(OnlineSDPOUpdater, "save_checkpoint", save_with_a_file_size_limit)
    out = tmp_path / "run"
    code = eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=2, eval_every=0,
                                             save_checkpoints=True, checkpoint_every=1))
    error = last_line(capsys.readouterr().err)
    step_2 = out / "checkpoints" / "feedback" / "step_000002"
    assert code == 1 and error.startswith(f"{ERROR_PREFIX} cannot write {step_2}: File too large"), error
    assert "completed steps are in" in error and "--resume" in error
    verify_checkpoint(out / "checkpoints" / "feedback" / "step_000001")  # the previous checkpoint survives
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 1
    assert sorted(p.name for p in (out / "checkpoints" / "feedback").iterdir()) == ["step_000001"]  # no .partial
