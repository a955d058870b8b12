"""--overlap_generation: the next batch is answered in a thread while the update runs, by a frozen copy
of the weights from before that update. Held here against a replay with a fresh updater: step 2 is
answered by the initial weights, step 3 by the weights after update 1, and so on."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

import eval_online_sdpo
from auxiliary.evals.evaluation_helpers import prompt_as_messages
from auxiliary.online.arms import FrozenPolicy
from auxiliary.runtime.cli import parse_dataclasses
from auxiliary.runtime.generation import run_side_by_side
from auxiliary.runtime.seeds import derive_seed
from online_sdpo_updater import OnlineSDPOUpdater
from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig
from reliability_helpers import flags_from_values, read_jsonl, read_metrics, without_timings

TRAIN = [f"Tell me something about topic number {i}." for i in range(4)]
EVAL = [f"Explain idea {i} in simple terms." for i in range(3)]
SEED = 3


@pytest.fixture(scope="module")
def data_dir(prompt_dir):
    return prompt_dir("overlap_data", TRAIN, EVAL)


def run_flags(model_dir, data_dir, out, **overrides) -> list[str]:
    values = {"model": model_dir, "train_jsonl": Path(data_dir) / "train.jsonl",
              "val_jsonl": Path(data_dir) / "validation.jsonl", "style": "concise", "train_n": 4, "eval_n": 3,
              "eval_every": 2, "max_new_tokens": 12, "eval_max_new_tokens": 12, "lr": 3e-3, "temperature": 0.9,
              "top_p": 0.9, "loss_mode": "simple_signal", "placebo": True, "output_dir": out, "seed": SEED}
    values.update(overrides)
    return flags_from_values(values)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("overlap_runs")
    settings = {"in_turn": {}, "overlap": {"overlap_generation": True},
                "overlap_arms_in_parallel": {"overlap_generation": True, "arms_in_parallel": True}}
    outs = {}
    for name, extra in settings.items():
        outs[name] = base / name
        assert eval_online_sdpo.main(run_flags(tiny_model_dir, data_dir, outs[name], **extra)) == 0
    return outs


def train_rows(out: Path, arm: str = "feedback") -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(out / "completions.jsonl") if r["phase"] == "train" and r["arm"] == arm}


def test_each_batch_is_answered_by_the_weights_of_one_update_before(runs, tiny_model_dir, data_dir):
    rows = train_rows(runs["overlap"])
    flags = run_flags(tiny_model_dir, data_dir, runs["overlap"] / "unused")
    sdpo, _ = parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), flags)
    updater = OnlineSDPOUpdater(dataclasses.replace(sdpo, scheduler_steps=4))  # the run's 4 updates

    def reply(step):
        return updater.generate([prompt_as_messages(rows[step]["prompt"])],
                                seed=derive_seed(SEED, "train", step))[0]

    first, second = reply(1), reply(2)  # both by the initial weights
    assert [first.text, second.text] == [rows[1]["completion"], rows[2]["completion"]]
    updater.train_batch([prompt_as_messages(rows[1]["prompt"])], [first.ids], [rows[1]["followup"]])
    assert reply(3).text == rows[3]["completion"]  # by the weights after update 1, while update 2 ran
    # ...which is not what the run without the overlap wrote at step 2 (it waited for update 1)
    assert train_rows(runs["in_turn"])[2]["completion"] != rows[2]["completion"]


def test_metrics_say_which_update_answered(runs):
    for name, expected in (("in_turn", [0, 1, 2, 3]), ("overlap", [0, 0, 1, 2])):
        for arm in ("feedback", "placebo"):
            assert [row[arm]["generated_by_update"] for row in read_metrics(runs[name])] == expected, (name, arm)
            assert [row[arm]["update"] for row in read_metrics(runs[name])] == [1, 2, 3, 4]
    # the first update learns from the same interaction either way: the same loss
    first = [read_metrics(runs[name])[0]["feedback"]["loss"] for name in ("in_turn", "overlap")]
    assert first[0] == first[1]


def test_overlap_with_the_arms_in_parallel_is_the_same_run(runs):
    # four threads at once (two answering ahead, two updating), each with its own torch thread count
    alone, side_by_side = runs["overlap"], runs["overlap_arms_in_parallel"]
    assert without_timings(read_metrics(side_by_side)) == without_timings(read_metrics(alone))
    assert read_jsonl(side_by_side / "completions.jsonl") == read_jsonl(alone / "completions.jsonl")


def test_overlap_refuses_resume_before_writing(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = eval_online_sdpo.main(run_flags(tiny_model_dir, data_dir, out, overlap_generation=True, resume=True))
    assert code == 2
    err = capsys.readouterr().err
    assert "--overlap_generation needs a run without --resume" in err
    assert not out.exists()


def test_run_side_by_side_gives_each_thread_its_share_and_restores_the_caller():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        both_running = threading.Barrier(2, timeout=30)  # passes only when the two calls run at once

        def call():
            both_running.wait()
            return threading.current_thread().name, torch.get_num_threads()

        seen = run_side_by_side([call, call])
        assert [count for _, count in seen] == [2, 2]
        assert seen[0][0] != seen[1][0]  # two threads
        # nested: each half split again, whatever the other half set meanwhile
        nested = run_side_by_side([lambda: run_side_by_side([torch.get_num_threads] * 2)] * 2)
        assert nested == [[1, 1], [1, 1]]
        assert torch.get_num_threads() == 4
        assert run_side_by_side([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]  # results in order
        with pytest.raises(ValueError, match="boom"):
            run_side_by_side([lambda: 1, lambda: (_ for _ in ()).throw(ValueError("boom"))])
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_schedule_batches_and_lora_with_checkpoints(tiny_model_dir, data_dir, tmp_path):
    # B = 2 over a flip after 4 interactions, LoRA (with its dropout: only the update draws from the process's
    # stream, the answering thread never does) and checkpoints
    out = tmp_path / "lora"
    flags = run_flags(tiny_model_dir, data_dir, out, overlap_generation=True, interactions_per_update=2,
                      style_schedule="concise:2,detailed:2", use_lora=True, save_checkpoints=True)
    assert eval_online_sdpo.main(flags) == 0
    rows = read_metrics(out)
    assert [row["style"] for row in rows] == ["concise", "concise", "detailed", "detailed"]
    assert [row["feedback"]["update"] for row in rows] == [1, 1, 2, 2]
    assert [row["feedback"]["generated_by_update"] for row in rows] == [0, 0, 0, 0]  # batch 2 beside update 1
    assert (out / "checkpoints" / "latest.json").exists()


def test_frozen_copy_takes_the_lora_weights_at_refresh(tiny_model_dir):
    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model=str(tiny_model_dir), use_lora=True, lora_dropout=0.0,
                                                 lr=1e-2, max_new_tokens=6, loss_mode="simple_signal", seed=1))
    frozen = FrozenPolicy(updater)
    assert frozen.pairs and all("lora" in name for name, p in updater.model.named_parameters() if p.requires_grad)
    conversation = [{"role": "user", "content": "Say something."}]
    reply = updater.generate([conversation], seed=5)[0]
    updater.train_batch([conversation], [reply.ids], ["Much shorter, please."])

    def same_weights():
        theirs = updater.model.state_dict()
        return all(torch.equal(tensor, theirs[name]) for name, tensor in frozen.model.state_dict().items())

    assert not same_weights() and frozen.updates == 0
    frozen.refresh()
    assert same_weights() and frozen.updates == 1


def test_failure_while_answering_ahead_keeps_the_batch_before(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    from auxiliary.feedback.user_simulator import EmptyFeedbackError, RuleBasedUserSimulator

    real = RuleBasedUserSimulator.generate_feedback
    failing_seed = derive_seed(SEED, "user", "feedback", 3)

    def feedback(self, prompts, completions, seed=None):
        if seed == failing_seed:  # the user of step 3, asked while update 2 runs
            raise EmptyFeedbackError("no follow-up for step 3")
        return real(self, prompts, completions, seed=seed)

    monkeypatch.setattr(RuleBasedUserSimulator, "generate_feedback", feedback)
    out = tmp_path / "out"
    assert eval_online_sdpo.main(run_flags(tiny_model_dir, data_dir, out, overlap_generation=True, placebo=False)) == 1
    err = capsys.readouterr().err
    assert "no follow-up for step 3" in err and "cannot be resumed exactly" in err
    assert [row["step"] for row in read_metrics(out)] == [1, 2]  # step 2's update finished and was written


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["overlap_generation", "arms_in_parallel"])
def test_sigterm_while_threads_work_exits_cleanly(flag, tiny_model_dir, data_dir, tmp_path):
    # the signal reaches the main thread while it waits for the threads: they finish their call first,
    # or the process would exit with a thread inside torch (an abort, exit 134)
    import signal
    import time

    from reliability_helpers import clean_env, last_line, start_cli

    out, log = tmp_path / "run", tmp_path / "child.log"
    flags = run_flags(tiny_model_dir, data_dir, out, train_n=4, eval_every=0, max_new_tokens=48, **{flag: True})
    child = start_cli(flags, clean_env(), log_path=log)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 143, log.read_text()[-2000:]
    assert "terminated (SIGTERM)" in last_line(log.read_text())
