"""Crash and resume, atomic result files and the non-finite guard of eval_online_sdpo.py, end to end.

The crash is a real SIGKILL of the CLI in the middle of step k: the run's simulated user is Claude
behind a scripted loopback server that answers at once, except for step k's request, which it holds.
The process is killed while it waits for that answer (its reply to step k generated, the update not
yet made), then restarted with --resume (in process, as a child would see it). No test hook lives in the product
code.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import eval_online_sdpo
from katan_server import StubResponse, stub_factory  # noqa: F401 (fixture)
from reliability_helpers import data_dir, one_torch_thread  # noqa: F401 (fixtures)
from reliability_helpers import (anthropic_message, clean_env, leftover_temp_files, online_args, read_json, read_jsonl,
                                 run_like_a_child, start_cli, without_timings)

FOLLOWUP = "Too long for me, please keep it shorter."

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def claude_answers(n: int, hold_at: int | None = None) -> list[StubResponse]:
    """n quick answers with the same follow-up; request number `hold_at` (1-based) gets no answer in time."""
    return [StubResponse(200, body=anthropic_message(FOLLOWUP), delay_s=3600.0 if i + 1 == hold_at else 0.0)
            for i in range(n)]


def safetensors_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def optimizer_tensors(folder: Path) -> list[torch.Tensor]:
    state = torch.load(folder / "optimizer.pt", weights_only=False)["state"]
    return [value for key in sorted(state) for _, value in sorted(state[key].items())]


@pytest.mark.slow  # a CLI process, killed, beside an uninterrupted run and a resumed run in process
def test_sigkill_mid_step_then_resume_matches_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path, stub_factory,
                                                                   monkeypatch, capfd):
    kill_step, steps = 4, 6
    full_out, crash_out = tmp_path / "full", tmp_path / "crashed"
    # checkpoints after steps 2, 4, 6; evaluations at 0, 3, 6: step 3's records come after the last
    # checkpoint before the kill, so --resume must drop and replay them
    flags = dict(user_simulator="claude", train_n=steps, eval_every=3, placebo=True, save_checkpoints=True,
                 checkpoint_every=2, max_checkpoints=5)
    full_stub, crash_stub = stub_factory(claude_answers(20)), stub_factory(claude_answers(20, hold_at=kill_step))
    crash_log = tmp_path / "crash.log"
    crash = start_cli(online_args(tiny_model_dir, data_dir, crash_out, **flags),
                      clean_env(ANTHROPIC_API_KEY="sk-test-resume", ANTHROPIC_BASE_URL=crash_stub.base_url),
                      log_path=crash_log)
    try:  # the uninterrupted run in this process (as a child would see it) while the child heads for its kill
        full = run_like_a_child(eval_online_sdpo.main, online_args(tiny_model_dir, data_dir, full_out, **flags),
                                monkeypatch, capfd, ANTHROPIC_API_KEY="sk-test-resume",
                                ANTHROPIC_BASE_URL=full_stub.base_url)
        deadline = time.monotonic() + 240
        while crash_stub.received < kill_step:  # step k's follow-up request is being held
            assert crash.poll() is None, crash_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the crash run never reached step k"
            time.sleep(0.1)
        os.kill(crash.pid, signal.SIGKILL)
        crash.wait(timeout=30)
    finally:
        if crash.poll() is None:
            crash.kill()
    assert crash.returncode == -signal.SIGKILL
    assert full.returncode == 0, full.stderr[-3000:]
    # the state the kill left: steps 1..k-1 recorded, last complete checkpoint at step 2
    assert [m["step"] for m in read_jsonl(crash_out / "metrics.jsonl")] == list(range(1, kill_step))
    assert read_json(crash_out / "checkpoints" / "latest.json")["step"] == 2

    resume_stub = stub_factory(claude_answers(20))  # the restart: in process, as a child would see it
    resumed = run_like_a_child(eval_online_sdpo.main, online_args(tiny_model_dir, data_dir, crash_out, resume=True,
                                                                  **flags),
                               monkeypatch, capfd, ANTHROPIC_API_KEY="sk-test-resume",
                               ANTHROPIC_BASE_URL=resume_stub.base_url)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resume_stub.received == steps - 2  # replayed from the checkpoint after step 2

    metrics_full, metrics_resumed = read_jsonl(full_out / "metrics.jsonl"), read_jsonl(crash_out / "metrics.jsonl")
    assert [m["step"] for m in metrics_resumed] == list(range(1, steps + 1))  # no gap, no duplicate
    assert without_timings(metrics_resumed) == without_timings(metrics_full)
    history_full, history_resumed = read_json(full_out / "eval_history.json"), read_json(
        crash_out / "eval_history.json")
    assert [r["step"] for r in history_resumed] == [r["step"] for r in history_full]
    assert sorted({r["step"] for r in history_resumed}) == [0, 3, 6]
    assert without_timings(history_resumed) == without_timings(history_full)
    assert read_jsonl(crash_out / "completions.jsonl") == read_jsonl(full_out / "completions.jsonl")
    assert read_json(crash_out / "baseline_completions.json") == read_json(full_out / "baseline_completions.json")
    # bit for bit: final weights and optimizer moments of both arms
    for arm in ("feedback", "placebo"):
        final_full = full_out / "checkpoints" / arm / f"step_{steps:06d}"
        final_resumed = crash_out / "checkpoints" / arm / f"step_{steps:06d}"
        weights_full, weights_resumed = safetensors_of(final_full), safetensors_of(final_resumed)
        assert weights_full.keys() == weights_resumed.keys()
        assert all(torch.equal(weights_full[k], weights_resumed[k]) for k in weights_full), arm
        assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(final_full), optimizer_tensors(final_resumed)))
    assert not leftover_temp_files(crash_out) and not leftover_temp_files(full_out)


# --------------------------------------------------------------------------- atomic writes

APPEND_ONLY = {"completions.jsonl", "run.log"}  # appended line by line (fsync each); resume drops a cut last line


def test_every_result_file_is_written_through_a_temporary_file(tiny_model_dir, data_dir, tmp_path):
    """Audit every open-for-writing under the output folder during a run with both arms and checkpoints."""
    out = tmp_path / "audited"
    writes: list[tuple[str, str]] = []
    state = {"on": False}

    def audit(event, args):
        if not state["on"] or event not in ("open", "os.rename"):
            return
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or \
                      (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and isinstance(path, (str, bytes, os.PathLike)) and str(out) in os.fsdecode(path):
                writes.append(("open", os.fsdecode(path)))
        else:
            writes.append(("rename", os.fsdecode(args[1])))

    sys.addaudithook(audit)  # hooks cannot be removed: this one is switched off after the run
    state["on"] = True
    try:
        code = eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=3, eval_every=2, placebo=True,
                                                 save_checkpoints=True))
    finally:
        state["on"] = False
    assert code == 0
    direct = []
    for kind, name in writes:
        path = Path(name)
        relative = path.relative_to(out)
        temporary = path.name.startswith(".") and (".tmp" in path.name or path.name.startswith(".write_test."))
        in_partial_checkpoint = any(part.endswith(".partial") for part in relative.parts[:-1])
        folder_lock = path.name == ".lock"  # created whole with O_EXCL, never rewritten
        if kind == "open" and not (temporary or in_partial_checkpoint or folder_lock or path.name in APPEND_ONLY):
            direct.append(str(relative))
    assert direct == [], f"written in place, not through a temporary file: {sorted(set(direct))}"
    renamed = {Path(name).relative_to(out).as_posix() for kind, name in writes if kind == "rename"}
    for name in ("config.json", "metrics.jsonl", "eval_history.json", "winrate.png", "summary.json",
                 "baseline_completions.json", "checkpoints/latest.json", "checkpoints/feedback/step_000003"):
        assert name in renamed, name
    assert not leftover_temp_files(out)


# --------------------------------------------------------------------------- non-finite guard

class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward hands back an infinite gradient (a finite loss, a non-finite norm)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_steps_are_skipped_counted_and_logged(tiny_model_dir, data_dir, tmp_path, monkeypatch, caplog):
    import online_sdpo_updater

    real_loss, calls = online_sdpo_updater.sdpo_loss, {"n": 0}

    def faulty_loss(*args, **kwargs):  # step 2: NaN loss; step 4: finite loss, infinite gradient
        loss, stats = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            return loss * float("nan"), {**stats, "loss": float("nan")}
        if calls["n"] == 4:
            return _InfiniteGradient.apply(loss), stats
        return loss, stats

    monkeypatch.setattr(online_sdpo_updater, "sdpo_loss", faulty_loss)
    out = tmp_path / "guarded"
    with caplog.at_level(logging.WARNING):
        assert eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, train_n=5, eval_every=0,
                                                 save_checkpoints=True, max_checkpoints=10)) == 0
    lines = {m["step"]: m["feedback"] for m in read_jsonl(out / "metrics.jsonl")}
    assert [lines[s]["skipped"] for s in range(1, 6)] == [False, True, False, True, False]
    assert [lines[s]["skipped_nonfinite"] for s in range(1, 6)] == [0, 1, 1, 2, 2]
    raw = (out / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw  # strict JSON: non-finite numbers are null
    assert lines[2]["loss"] is None and lines[2]["grad_norm"] is None
    assert lines[4]["grad_norm"] is None and lines[4]["loss"] is not None
    log = (out / "run.log").read_text()
    assert log.count("non-finite loss/gradient, update skipped") == 2

    def checkpoint(step):
        return out / "checkpoints" / "feedback" / f"step_{step:06d}"

    for skipped in (2, 4):  # weights and optimizer state exactly as before the skipped step
        before, after = safetensors_of(checkpoint(skipped - 1)), safetensors_of(checkpoint(skipped))
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(checkpoint(skipped - 1)),
                                                      optimizer_tensors(checkpoint(skipped))))
        assert json.loads((checkpoint(skipped) / "updater_state.json").read_text())["skipped_nonfinite"] == skipped // 2
    moved = safetensors_of(checkpoint(3))
    assert any(not torch.equal(moved[k], safetensors_of(checkpoint(2))[k]) for k in moved)  # step 3 did update


def test_checkpoint_files_reach_the_disk_before_the_rename(tiny_model_dir, tmp_path, monkeypatch):
    """Every file of a checkpoint is fsynced under its .partial name, then the folder is renamed."""
    import auxiliary.runtime.io_utils as io_utils
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model=str(tiny_model_dir), device="cpu", loss_mode="simple_signal"))
    monkeypatch.setattr(io_utils.os, "fsync", recording_fsync)
    final = updater.save_checkpoint(tmp_path / "ckpt" / "step_000000")
    files = [p for p in final.rglob("*") if p.is_file()]
    assert len(files) >= 6  # weights, tokenizer files, optimizer, rng, state, config
    partial = final.with_name(final.name + ".partial")
    for path in files:
        assert str(partial / path.relative_to(final)) in flushed, path
    assert str(final.parent) in flushed  # the rename itself made durable
