"""The benchmarks run end to end in tiny mode, print parseable ratio lines, and their yardstick and meters are right."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_common  # noqa: E402
from sdpo_objective import ObjectiveOptions  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads crawl on a loaded 2-core machine; restore the setting for other tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_script(args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_bench_objective_tiny_prints_ratios_and_json(tmp_path):
    out = tmp_path / "objective.json"
    stdout = run_script([sys.executable, "bench/bench_objective.py", "--tiny", "--out", str(out)])
    assert "equivalence simple_signal" in stdout and "equivalence full_distillation" in stdout
    ratios = bench_common.parse_ratio_lines(stdout)
    for metric in ("peak_memory", "update_time", "update_cpu_time"):
        for mode in ("simple_signal", "full_distillation"):
            value = ratios[f"{metric}_{mode}"]
            assert math.isfinite(value) and value > 0, (metric, mode, value)
        assert math.isfinite(ratios[f"update_time_{mode}_fused_vs_checkpointed"])
    report = json.loads(out.read_text())
    assert report["ratios"] == pytest.approx(ratios, abs=1e-4)
    cases = {(r["batch"], r["context"], r["response"], r["vocab"]) for r in report["rows"]}
    assert len(report["rows"]) == len(cases) * 6  # 2 modes x 3 paths per case
    assert {r["path"] for r in report["rows"]} == {"ours", "checkpointed", "straightforward"}
    for row in report["rows"]:
        assert row["error"] is None and row["peak_bytes"] > 0 and row["time_s"] > 0
        assert row["tokens"] == row["batch"] * row["response"]


def test_gpu_check_cpu_tiny_prints_ratios():
    stdout = run_script(["bash", "bench/gpu_check.sh", "--device", "cpu", "--tiny", "--threads", "1"])
    assert "torch " in stdout and "resp tok/s" in stdout
    ratios = bench_common.parse_ratio_lines(stdout)
    modes = ("simple_signal", "full_distillation")
    expected = {f"{metric}_{mode}_tiny" for metric in ("update_time", "peak_memory", "peak_memory_total") for mode in modes}
    expected |= {f"update_time_{mode}_tiny_fused_vs_checkpointed" for mode in modes}
    assert set(ratios) == expected
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())


def test_cpu_peak_memory_meter_sees_a_known_allocation():
    with bench_common.PeakMemory("cpu") as meter:
        block = torch.ones(16 * 2**20 // 4)  # 16 MiB, alive at the end
        temporary = torch.ones(32 * 2**20 // 4)  # 32 MiB, freed before the second one
        del temporary
        second = torch.ones(8 * 2**20 // 4)
    assert 48 * 2**20 <= meter.peak < 49 * 2**20  # 16 + 32 at the worst moment, not 16 + 32 + 8
    del block, second


def test_equivalence_check_rejects_a_yardstick_that_differs(monkeypatch):
    report = bench_common.check_equivalence("cpu", vocab_size=256)
    for loss_ours, loss_straight, grad_diff in report.values():
        assert loss_ours == pytest.approx(loss_straight, rel=1e-4) and grad_diff < 1e-3

    original = bench_common.straightforward_loss
    monkeypatch.setitem(bench_common.LOSS_FUNCTIONS, "straightforward",
                        lambda *args: original(*args) * 1.001)  # 0.1% off: must be caught
    with pytest.raises(AssertionError, match="loss"):
        bench_common.check_equivalence("cpu", vocab_size=256)
    monkeypatch.setitem(bench_common.LOSS_FUNCTIONS, "straightforward", original)
    monkeypatch.setitem(bench_common.LOSS_FUNCTIONS, "checkpointed",
                        lambda *args: original(*args) * 0.999)  # every path is checked, not only ours
    with pytest.raises(AssertionError, match="checkpointed"):
        bench_common.check_equivalence("cpu", vocab_size=256)


def test_yardstick_simple_signal_by_hand():
    """One sequence: loss = -sum_t A_t log p_x(y_t) / |y| with A_t = log p_xo(y_t) - log p_x(y_t)."""
    model = bench_common.qwen3_model(64, hidden_size=32, num_layers=1, seed=0)
    batch_x, batch_xo = bench_common.random_batches(1, 5, 4, 64, hindsight_tokens=3, seed=0)
    loss = bench_common.straightforward_loss(model, batch_x, batch_xo, ObjectiveOptions(loss_mode="simple_signal"))

    def token_logprobs(batch):
        with torch.no_grad():
            logits = model(batch.input_ids).logits[0]
        start = batch.context_width - 1
        return torch.stack([torch.log_softmax(logits[start + t], -1)[int(y)]
                            for t, y in enumerate(batch.response_ids[0])])

    logp_x, logp_xo = token_logprobs(batch_x), token_logprobs(batch_xo)
    expected = -((logp_xo - logp_x) * logp_x).sum() / 4
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("mode", ["simple_signal", "full_distillation"])
def test_trl_peer_path_computes_the_same_loss(mode):
    """bench/peers.py calls TRL's own self-distillation losses; they must equal ours before anything is timed."""
    import torch
    from bench_common import LOSS_FUNCTIONS, qwen3_model, random_batches
    from peers import trl_available, trl_loss

    from sdpo_objective import ObjectiveOptions

    if not trl_available():
        pytest.skip("trl.experimental.sdpo not installed")
    torch.manual_seed(0)
    model = qwen3_model(512, 64, 2)
    batch_x, batch_xo = random_batches(2, 16, 24, 512)[:2]
    opts = ObjectiveOptions(loss_mode=mode)
    ours = LOSS_FUNCTIONS["ours"](model, batch_x, batch_xo, opts)
    assert float(trl_loss(model, batch_x, batch_xo, opts)) == pytest.approx(float(ours), rel=1e-4, abs=1e-9)
