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
from sdpo_objective import ObjectiveOptions, resolve_chunk_size  # noqa: E402


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


def test_bench_objective_tiny_prints_ratios_and_json(tmp_path, capsys):
    import bench_objective
    from peers import trl_available

    out = tmp_path / "objective.json"
    # in-process: a child process would spend most of its time importing torch, transformers and TRL again
    assert bench_objective.main(["--tiny", "--chunk_size", "16", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "equivalence simple_signal" in stdout and "equivalence full_distillation" in stdout
    ratios = bench_common.parse_ratio_lines(stdout)
    modes = ("simple_signal", "full_distillation")
    peers = ("trl", "paper") if trl_available() else ("paper",)
    expected = {f"{metric}_{mode}" for metric in ("peak_memory", "update_time", "update_cpu_time") for mode in modes}
    expected |= {f"update_time_{mode}_fused_vs_checkpointed" for mode in modes}
    expected |= {f"{metric}_vs_{peer}_{mode}"
                 for metric in ("update_time", "update_cpu_time", "peak_memory", "peak_rss")
                 for peer in peers for mode in modes}
    expected |= {f"{metric}_vs_floor_{mode}" for metric in ("update_time", "update_cpu_time") for mode in modes}
    assert set(ratios) == expected
    assert all(math.isfinite(value) and value > 0 for value in ratios.values()), ratios
    report = json.loads(out.read_text())
    assert report["ratios"] == pytest.approx(ratios, abs=1e-4)
    assert report["chunk_size"] == 16
    paths = {"ours", "checkpointed", "straightforward", *peers, "floor"}
    cases = {(r["batch"], r["context"], r["response"], r["vocab"]) for r in report["rows"]}
    assert len(report["rows"]) == len(cases) * 2 * len(paths)
    assert {r["path"] for r in report["rows"]} == paths
    for row in report["rows"]:
        assert row["error"] is None and row["peak_bytes"] > 0 and row["time_s"] > 0
        assert row["tokens"] == row["batch"] * row["response"]
    by_case = {}
    for row in report["rows"]:
        by_case.setdefault((row["batch"], row["response"], row["mode"]), {})[row["path"]] = row["loss"]
    for losses in by_case.values():  # the printed losses were checked equal before timing
        for path in paths - {"floor"}:
            assert losses[path] == pytest.approx(losses["straightforward"], rel=1e-3, abs=1e-7)
        assert abs(losses["straightforward"]) > 1e-4  # spread logits: a real loss, far above the tolerance
    # the ratio lines are the rows' own numbers: ours / trl peak memory of the headline (largest) case
    if "trl" in peers:
        rows = {(r["path"], r["mode"]): r for r in report["rows"] if (r["batch"], r["response"]) == (1, 64)}
        expected_ratio = (rows["ours", "full_distillation"]["peak_bytes"]
                          / rows["trl", "full_distillation"]["peak_bytes"])
        assert ratios["peak_memory_vs_trl_full_distillation"] == pytest.approx(expected_ratio, abs=1e-4)


def test_bench_objective_rejects_a_bad_chunk_size():
    import bench_objective

    with pytest.raises(SystemExit):
        bench_objective.parse_args(["--chunk_size", "0"])
    assert bench_objective.parse_args(["--chunk-size", "32"]).chunk_size == 32


def test_case_loss_check_rejects_a_path_that_differs():
    from bench_objective import check_case_losses

    check_case_losses({"straightforward": 0.5, "ours": 0.50001, "trl": 0.5, "floor": 123.0}, "case")
    with pytest.raises(AssertionError, match="paper"):
        check_case_losses({"straightforward": 0.5, "ours": 0.5, "paper": 0.501}, "case")  # 0.2% off


def test_gpu_check_sh_keeps_its_own_flag_and_passes_the_rest_on():
    # gpu_check.py would stop at an unknown --no-deepspeed; --help proves the rest reaches it
    stdout = run_script(["bash", "bench/gpu_check.sh", "--no-deepspeed", "--help"])
    assert "usage: gpu_check.py" in stdout and "--tiny" in stdout


def test_gpu_check_cpu_tiny_prints_ratios(capsys):
    import gpu_check
    from peers import trl_available

    # in-process (the wrapper's own part is the test above): a child would import torch and TRL again
    assert gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "torch " in stdout and "resp tok/s" in stdout
    assert "tiny_lora8: " in stdout and "M trained" in stdout
    ratios = bench_common.parse_ratio_lines(stdout)
    modes = ("simple_signal", "full_distillation")
    expected = set()
    for setup in ("tiny", "tiny_lora8"):
        expected |= {f"{metric}_{mode}_{setup}" for metric in ("update_time", "peak_memory", "peak_memory_total")
                     for mode in modes}
        expected |= {f"update_time_{mode}_{setup}_fused_vs_checkpointed" for mode in modes}
        if trl_available():
            expected |= {f"{metric}_vs_trl_{mode}_{setup}" for metric in ("update_time", "peak_memory")
                         for mode in modes}
    assert set(ratios) == expected
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())


def test_gpu_check_lora_trains_the_adapters_only():
    import gpu_check

    model = gpu_check.with_lora(bench_common.qwen3_model(**gpu_check.TINY_SHAPES["tiny"]), 8)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    assert any("down_proj" in name for name in trained) and not any("lm_head" in name for name in trained)
    assert gpu_check.setup_name("qwen3-8b", 256) == "qwen3-8b_lora256" and gpu_check.setup_name("tiny", 0) == "tiny"
    assert ("qwen3-8b", 256, 4) in gpu_check.SETUPS and gpu_check.QWEN3_SHAPES["qwen3-8b"]["num_layers"] == 36


def test_peer_check_rejects_a_peer_that_differs(monkeypatch):
    import peers

    report = peers.check_peers("cpu", vocab_size=256)
    assert set(report["simple_signal"]) >= {"straightforward", "paper"}
    original = peers.paper_loss
    monkeypatch.setattr(peers, "paper_loss", lambda *args, **kwargs: original(*args, **kwargs) * 1.001)
    with pytest.raises(AssertionError, match="paper"):
        peers.check_peers("cpu", vocab_size=256)


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
    assert float(trl_loss(model, batch_x, batch_xo, opts).detach()) == pytest.approx(float(ours.detach()),
                                                                                     rel=1e-4, abs=1e-9)


def test_paper_path_scores_the_retokenised_text():
    """The paper path reads the replies as text: same text, the yardstick's loss; one word changed, another loss."""
    from peers import paper_loss, text_batch, word_tokenizer

    vocab = 300
    model = bench_common.qwen3_model(vocab, hidden_size=32, num_layers=1, seed=0)
    batch_x, batch_xo = bench_common.random_batches(2, 6, 9, vocab, hindsight_tokens=4, ragged=True, seed=0)
    tokenizer = word_tokenizer(vocab)
    texts = text_batch(tokenizer, batch_x, batch_xo)
    first_reply = batch_x.response_ids[0][batch_x.response_mask[0]].tolist()
    assert texts.replies[0] == " ".join(f"w{i}" for i in first_reply)
    assert texts.contexts_xo[1][:len(texts.contexts_x[1])] == texts.contexts_x[1]
    for mode in ("simple_signal", "full_distillation"):
        opts = ObjectiveOptions(loss_mode=mode)
        expected = float(bench_common.straightforward_loss(model, batch_x, batch_xo, opts).detach())
        assert float(paper_loss(model, tokenizer, texts, opts).detach()) == pytest.approx(expected, rel=1e-6)
    texts.replies[0] = texts.replies[0].replace(f"w{first_reply[0]} ", f"w{(first_reply[0] + 1) % vocab} ", 1)
    simple = ObjectiveOptions(loss_mode="simple_signal")
    changed = float(paper_loss(model, tokenizer, texts, simple).detach())
    assert changed != pytest.approx(float(bench_common.straightforward_loss(model, batch_x, batch_xo, simple).detach()),
                                    rel=1e-6)


def test_floor_has_the_gradients_of_the_head_products():
    """floor_loss's backward: grad W = sum over rows of (teacher logits)^T student hidden, computed here directly."""
    vocab = 200
    model = bench_common.qwen3_model(vocab, hidden_size=32, num_layers=1, seed=0)
    batch_x, batch_xo = bench_common.random_batches(2, 5, 7, vocab, hindsight_tokens=3, seed=0)
    model.zero_grad(set_to_none=True)
    bench_common.floor_loss(model, batch_x, batch_xo, ObjectiveOptions(logits_chunk_size=3)).backward()
    weight = model.lm_head.weight.detach()
    with torch.no_grad():
        model.eval()
        hidden_t = model(input_ids=batch_xo.input_ids, output_hidden_states=True).hidden_states[-1]
        model.train()
        hidden_s = model(input_ids=batch_x.input_ids, output_hidden_states=True).hidden_states[-1]
    rows_s = hidden_s[:, batch_x.context_width - 1:-1].reshape(-1, 32)
    rows_t = hidden_t[:, batch_xo.context_width - 1:-1].reshape(-1, 32)
    expected = (rows_t @ weight.t()).t() @ rows_s
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-5)
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # the backbone's backward ran


def test_chunk_size_sweep_tiny_prints_ratios_against_the_default(capsys):
    import bench_chunk_size

    assert bench_chunk_size.main(["--tiny", "--repeats", "1", "--sizes", "16,32", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    default = resolve_chunk_size(None, "cpu")  # the CPU default (64)
    ratios = bench_common.parse_ratio_lines(stdout)
    assert set(ratios) == {f"{metric}_chunk{size}_vs_chunk{default}_{mode}" for metric in ("update_time", "peak_memory")
                           for size in (16, 32) for mode in ("simple_signal", "full_distillation")}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert "fastest chunk size (full_distillation): " in stdout
    with pytest.raises(SystemExit):
        bench_chunk_size.parse_args(["--sizes", "0,32"])


def test_breakdown_sorts_operators_by_the_tensors_they_touch():
    from bench_breakdown import kind_of

    vocab = 1000
    assert kind_of("aten::mm", [[32, 64], [64, vocab]], vocab) == "head_products"
    assert kind_of("aten::addmm_", [[vocab, 64], [vocab, 32], [32, 64]], vocab) == "head_products"  # G^T h
    assert kind_of("aten::_log_softmax", [[32, vocab], []], vocab) == "vocabulary_passes"
    assert kind_of("aten::embedding", [[vocab, 64], [1, 40]], vocab) == "backbone_and_rest"  # a [V, H] weight
    assert kind_of("aten::mm", [[40, 64], [64, 192]], vocab) == "backbone_and_rest"


def test_bench_options_tiny_prints_the_ratios_of_every_option(capsys):
    import bench_options

    ratios = bench_options.main(["--model", "tiny-random", "--context", "6", "--response", "8", "--repeats", "1"])
    assert set(ratios) == {f"{option}_vs_plain_{mode}" for option in ("contrast", "copy_guard")
                           for mode in ("simple_signal", "full_distillation")} | {"end_signal_vs_plain_simple_signal"}
    assert bench_common.parse_ratio_lines(capsys.readouterr().out) == pytest.approx(ratios, abs=1e-4)


def test_hindsight_wording_tiny_reports_correlations_and_cosines(capsys):
    import hindsight_wording

    assert hindsight_wording.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]) == pytest.approx(0.9933992677987828)
    assert hindsight_wording.pearson([1.0, 1.0], [1.0, 2.0]) != hindsight_wording.pearson([1.0, 1.0], [1.0, 2.0])  # nan
    results = hindsight_wording.main(["--model", "tiny-random", "--n_cases", "2", "--max_new_tokens", "6"])
    assert set(results) == set(hindsight_wording.PARAPHRASES)
    for row in results.values():
        assert all(-1.0 <= row[key] <= 1.0 for key in ("token_r", "centred_token_r", "case_r", "update_cosine"))
    assert "between the paraphrases" in capsys.readouterr().out
