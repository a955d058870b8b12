"""bench/bench_online.py: the quick run ends with parseable ratio lines, its JSON agrees with them, and the
phase bookkeeping adds up (checked on hand-made timings)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_common  # noqa: E402
import bench_online  # noqa: E402

EXPECTED_RATIOS = {"eval_generation_time_batched", "eval_generation_cpu_time_batched", "teacher_forward_time_batched",
                   "update_time_fused_head", "checkpoint_save_time", "step0_eval_time_cached_baseline"}


def test_quick_run_prints_ratios_and_consistent_json(tmp_path, monkeypatch, capsys):
    import torch

    out = tmp_path / "online.json"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:  # in-process: a child would spend most of its time importing torch and transformers again
        code = bench_online.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    done = subprocess.CompletedProcess("bench_online.main", code, *capsys.readouterr())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # no handler is left logging into the runs' folders, which main() deleted (the next test's log line would fail)
    import logging

    left = [h.baseFilename for h in logging.getLogger().handlers if "bench_online_" in getattr(h, "baseFilename", "")]
    assert left == []
    ratios = bench_common.parse_ratio_lines(done.stdout)
    assert EXPECTED_RATIOS <= set(ratios), ratios
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios

    report = json.loads(out.read_text())
    assert report["ratios"] == pytest.approx(ratios, rel=1e-3)
    evalgen = report["eval_generation"]
    assert ratios["eval_generation_time_batched"] == pytest.approx(
        evalgen["wall_batched_s"] / evalgen["wall_single_s"], rel=1e-3)
    # fp32 greedy with left padding: the batch must give exactly the ids of one-at-a-time decoding
    assert evalgen["ids_compared"] == 4 and evalgen["ids_mismatches"] == 0
    tokens, finished = evalgen["tokens_generated"], evalgen["replies_finished_by_eos"]
    assert tokens == 4 * 8 if finished == 0 else 4 <= tokens <= 4 * 8
    # the teacher's log-probs do not depend on batching beyond float rounding
    assert report["teacher_forward"]["interactions"] == 2
    assert report["teacher_forward"]["max_abs_logprob_difference"] < 1e-4
    # the fused and the checkpointed head give the same losses on the same weights
    assert report["update_head"]["interactions"] == 2
    assert report["update_head"]["max_abs_loss_difference"] < 1e-5
    # both checkpoint paths write the same files (the copy path only adds the copy)
    checkpoint = report["checkpoint"]
    assert checkpoint["ours"]["bytes_written"] == checkpoint["snapshot"]["bytes_written"] > 0
    assert len(checkpoint["ours"]["walls_s"]) == len(checkpoint["snapshot"]["walls_s"]) == 2
    # rates follow from the phase means
    steady = report["phases_s"]["steady_mean"]
    assert set(steady) == set(bench_online.LOOP_PHASES)
    assert report["rates"]["interactions_per_minute"] == pytest.approx(60 / sum(steady.values()), rel=1e-6)
    assert len(report["phases_s"]["steady_per_step"]["update"]) == 2  # the warm-up interaction is apart
    assert report["retokenisation"]["replies"] == 3
    assert "load average at start" in done.stdout
    # the throughput sweep (--quick: B = 1, 2): its ratio is the ratio of the measured rates
    sweep = report["batch_sweep"]
    assert set(sweep) == {"B1", "B1_overlap", "B2", "B2_overlap"}
    # one warm-up, one timed, one last batch each; only the middle one counts
    assert all(len(result["update_walls_s"]) == 3 for result in sweep.values())
    assert sweep["B2"]["interactions"] == 2 and sweep["B2"]["interactions_per_minute"] == pytest.approx(
        60 * 2 / sweep["B2"]["update_walls_s"][1])
    assert ratios["interactions_per_minute_B2_vs_B1"] == pytest.approx(
        sweep["B2"]["interactions_per_minute"] / sweep["B1"]["interactions_per_minute"], rel=1e-3)
    for batch_size in (1, 2):
        assert sweep[f"B{batch_size}_overlap"]["overlap"] is True
        assert ratios[f"interactions_per_minute_overlap_vs_in_turn_B{batch_size}"] == pytest.approx(
            sweep[f"B{batch_size}_overlap"]["interactions_per_minute"] / sweep[f"B{batch_size}"][
                "interactions_per_minute"],
            rel=1e-3)


def test_loop_phases_split_hand_made_timings():
    """Three interactions (the first a warm-up), a cached step-0 evaluation and a final one; loop wall 30 s."""
    clock = bench_online.PhaseClock()
    clock.calls = {
        "interaction": [(10.0, 0), (5.0, 0), (7.0, 0)],
        "policy_generation": [(4.0, 0), (2.0, 0), (3.0, 0)],
        "feedback": [(1.0, 0), (1.0, 0), (1.0, 0)],
        "update": [(3.0, 0), (1.0, 0), (2.0, 0)],
        "evaluation": [(0.5, 0), (6.0, 0)],
        "eval_generation": [(4.0, 0)],
    }
    phases = bench_online.loop_phases(clock, loop_wall=30.0)
    # between interactions: 30 - (10 + 5 + 7) - (0.5 + 6) = 1.5 s, spread as 0.5 s per interaction
    assert phases["warmup"] == pytest.approx({"policy_generation": 4.0, "feedback": 1.0, "update": 3.0,
                                              "loop_other": 2.5})
    assert phases["steady_mean"] == pytest.approx({"policy_generation": 2.5, "feedback": 1.0, "update": 1.5,
                                                   "loop_other": 1.5})
    assert phases["final_eval"] == pytest.approx({"eval_generation": 4.0, "eval_other": 2.0})
    assert phases["step0_eval_with_cached_baseline"] == 0.5


def test_phase_clock_counts_each_call_under_its_phase():
    clock = bench_online.PhaseClock()
    shared = clock.wrap(lambda x: x * 2)  # counted under whatever phase is current
    fixed = clock.wrap(lambda: None, "feedback")
    with clock.current("policy_generation"):
        assert shared(3) == 6
        fixed()
        with clock.current("eval_generation"):
            shared(1)
        shared(2)
    assert {name: len(calls) for name, calls in clock.calls.items()} == {
        "policy_generation": 2, "feedback": 1, "eval_generation": 1}
    assert clock.phase is None

    failing = clock.wrap(lambda: 1 / 0, "update")
    with pytest.raises(ZeroDivisionError):
        failing()
    assert len(clock.walls("update")) == 1  # timed even when the call raises
