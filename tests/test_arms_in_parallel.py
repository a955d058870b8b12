"""--arms_in_parallel: the two arms in two threads give the run of one arm after the other, because
seeded sampling draws from a generator of its own (generation.SeededSampler), not the process's stream."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import eval_online_sdpo
from auxiliary.online.arms import Arms
from auxiliary.runtime.generation import SeededSampler, generate_responses
from reliability_helpers import flags_from_values, read_json, read_jsonl, read_metrics, without_timings

TRAIN = [f"Tell me something about topic number {i}." for i in range(4)]
EVAL = [f"Explain idea {i} in simple terms." for i in range(4)]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in EVAL]


@pytest.fixture(scope="module")
def data_dir(prompt_dir):
    return prompt_dir("parallel_data", TRAIN, EVAL)


def run_flags(model_dir, data_dir, out, **overrides) -> list[str]:
    values = {"model": model_dir, "train_jsonl": Path(data_dir) / "train.jsonl",
              "val_jsonl": Path(data_dir) / "validation.jsonl", "style": "concise", "train_n": 4, "eval_n": 4,
              "eval_every": 2, "max_new_tokens": 12, "eval_max_new_tokens": 12, "lr": 1e-3, "temperature": 0.9,
              "top_p": 0.9, "loss_mode": "simple_signal", "placebo": True, "output_dir": out, "seed": 3}
    values.update(overrides)
    return flags_from_values(values)


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("parallel_runs")
    outs = {}
    for name, parallel in (("sequential", False), ("parallel", True)):
        outs[name] = base / name
        assert eval_online_sdpo.main(run_flags(tiny_model_dir, data_dir, outs[name], arms_in_parallel=parallel)) == 0
    return outs


def test_arms_in_parallel_reproduce_one_arm_after_the_other(two_runs):
    sequential, parallel = two_runs["sequential"], two_runs["parallel"]
    assert without_timings(read_metrics(parallel)) == without_timings(read_metrics(sequential))
    assert read_jsonl(parallel / "completions.jsonl") == read_jsonl(sequential / "completions.jsonl")
    assert read_json(parallel / "baseline_completions.json") == read_json(sequential / "baseline_completions.json")
    history = [without_timings(read_json(out / "eval_history.json")) for out in (sequential, parallel)]
    assert history[0] == history[1]
    # not trivially equal: the arms trained apart, and their later replies differ
    rows = read_metrics(sequential)
    assert any(row["feedback"]["loss"] != row["placebo"]["loss"] for row in rows)
    final = [r for r in read_jsonl(sequential / "completions.jsonl") if r["phase"] == "eval" and r["step"] == 4]
    assert [r["completion"] for r in final if r["arm"] == "feedback"] != \
        [r["completion"] for r in final if r["arm"] == "placebo"]
    assert read_json(parallel / "config.json")["run"]["arms_in_parallel"] is True


def test_arms_in_parallel_restores_the_torch_threads(two_runs):
    # the run halves the threads only while both arms work; the process keeps its own count afterwards
    assert torch.get_num_threads() >= 1
    threads = torch.get_num_threads()
    arms = Arms(["feedback", "placebo"], in_parallel=True)
    seen = arms.per_arm(lambda arm: torch.get_num_threads())
    assert seen == {"feedback": max(1, threads // 2), "placebo": max(1, threads // 2)}
    assert torch.get_num_threads() == threads


def test_arms_in_parallel_refuses_a_model_with_dropout(tiny_model_dir, data_dir, tmp_path, capsys):
    # LoRA's dropout draws from the process's one random stream (0 by default, as the paper's)
    code = eval_online_sdpo.main(run_flags(tiny_model_dir, data_dir, tmp_path / "out", arms_in_parallel=True,
                                           use_lora=True, lora_dropout=0.05, train_n=2))
    assert code == 2
    assert "--arms_in_parallel needs a model without dropout" in capsys.readouterr().err
    assert eval_online_sdpo.main(run_flags(tiny_model_dir, data_dir, tmp_path / "out2", arms_in_parallel=True,
                                           use_lora=True, lora_dropout=0.0, train_n=2, eval_every=0)) == 0


def test_seeded_generation_ignores_the_process_random_stream_and_other_threads(tiny_model_dir):
    from auxiliary.runtime.model_loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_model_dir), "fp32", "auto", "cpu")

    def replies(seed, workers=1):
        return [r.ids
                for r in generate_responses(model, tokenizer, CONVERSATIONS, 16, 0.9, 0.9, batch_size=2, seed=seed,
                                                  workers=workers)]

    alone = replies(11)
    threads_before = torch.get_num_threads()
    assert replies(11, workers=2) == alone  # two batches side by side: the same replies, in order
    assert torch.get_num_threads() == threads_before
    torch.manual_seed(12345)
    torch.rand(7)  # the process's stream moved on: seeded replies do not care
    assert replies(11) == alone
    assert replies(12) != alone
    results = {}
    threads = [threading.Thread(target=lambda key=key: results.__setitem__(key, replies(11))) for key in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: alone, 1: alone}


def test_seeded_sampler_draws_from_the_temperature_and_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    temperature, top_p = 0.8, 0.85
    # independent: softmax at the temperature, then the smallest set of ids (by probability) reaching top_p
    probs = torch.softmax(logits / temperature, dim=-1)[0].double()
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for index in order.tolist():
        keep[index] = True
        mass += float(probs[index])
        if mass >= top_p:
            break
    expected = torch.where(keep, probs, 0.0)
    expected = expected / expected.sum()
    sampler = SeededSampler(temperature, top_p, torch.Generator().manual_seed(0))
    draws = 20000
    counts = torch.zeros(6)
    for _ in range(draws):
        out = sampler(None, logits.clone())
        assert torch.isfinite(out).sum() == 1 and out.max() == 0.0
        counts[int(out.argmax())] += 1
    assert counts[~keep].sum() == 0  # nothing outside the nucleus
    observed = counts.double() / draws
    assert torch.allclose(observed[keep], expected[keep], atol=4 * (0.25 / draws) ** 0.5)  # 4 SE of a share
