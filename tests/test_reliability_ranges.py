"""Every numeric flag is checked before anything is written: the allowed range in one line, exit 2."""
from pathlib import Path

import pytest

from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments
from online_sdpo_updater_config import OnlineSDPOConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("entry, overrides, message", [
    ("online", {"max_new_tokens": 0}, "--max_new_tokens must be >= 1, got 0"),
    ("online", {"generation_batch_size": 0}, "--generation_batch_size must be >= 1, got 0"),
    ("online", {"lr": float("inf")}, "--lr must be a finite number, got inf"),
    ("online", {"lr": 0.0}, "--lr must be > 0, got 0.0"),
    ("online", {"temperature": -1.0}, "--temperature must be >= 0, got -1.0"),
    ("online", {"top_p": 0.0}, "--top_p must be in (0, 1], got 0.0"),
    ("online", {"top_p": 1.5}, "--top_p must be in (0, 1], got 1.5"),
    ("online", {"lora_dropout": 1.0}, "--lora_dropout must be in [0, 1), got 1.0"),
    ("online", {"beta": float("nan")}, "--beta must be a finite number, got nan"),
    ("online", {"ignore_first_k": -1}, "--ignore_first_k must be >= 0, got -1"),
    ("online", {"logits_chunk_size": 0}, "--logits_chunk_size must be >= 1, got 0"),
    ("online", {"max_checkpoints": -2}, "--max_checkpoints must be >= 0, got -2"),
    ("online", {"vllm_gpu_memory_utilization": 1.2}, "--vllm_gpu_memory_utilization must be in (0, 1], got 1.2"),
    # the chat's counts: checked when the config is built, before the model loads
    ("chat", {"undo_depth": 0}, "--undo_depth must be >= 1, got 0"),
    ("chat", {"port": 0}, "--port must be in [1, 65535], got 0"),
    ("chat", {"port": 70000}, "--port must be in [1, 65535], got 70000"),
    ("chat", {"min_signal": -0.1}, "--min_signal must be >= 0, got -0.1"),
    ("chat", {"max_message_chars": 0}, "--max_message_chars must be >= 1, got 0"),
])
def test_configs_refuse_out_of_range_values_in_one_line(entry, overrides, message):
    from chat_sdpo import ChatConfig

    config = {"online": OnlineSDPOConfig, "chat": ChatConfig}[entry]
    with pytest.raises(ValueError) as caught:
        config(**overrides)
    assert str(caught.value) == message


def test_offline_arguments_use_the_same_ranges():
    with pytest.raises(ValueError, match=r"--max_grad_norm must be >= 0, got -1.0"):
        OfflineSDPOArguments(max_grad_norm=-1.0)


@pytest.mark.parametrize("module, args, message", [
    ("eval_online_sdpo", ["--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
    ("eval_online_sdpo", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("auxiliary.sdpo_signal_analysis", ["--n_cases", "-1"], "--n_cases must be >= 0, got -1"),
    ("auxiliary.eval_checkpoints", ["--checkpoints", "x", "--baseline_model", "y", "--top_p", "0"],
     "--top_p must be in (0, 1], got 0.0"),
    # --limit's row in the one table (it had a check of its own that named no value)
    ("auxiliary.eval_benchmarks", ["--baseline_model", "y", "--limit", "0"], "--limit must be >= 1, got 0"),
])
def test_entry_points_exit_2_with_the_range_and_write_nothing(tmp_path, module, args, message, monkeypatch, capsys):
    import importlib

    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    code = importlib.import_module(module).main([*args, "--output_dir", str(out)])  # what sys.exit gets
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_unknown_judge_framing_fails_before_anything_loads():
    from auxiliary.evals.style_eval import StyleEvalArgs
    from online_sdpo_updater_config import OnlineRunConfig

    with pytest.raises(ValueError, match="--judge_framing must be one of user, neutral, got 'referee'"):
        OnlineRunConfig(judge_framing="referee")
    with pytest.raises(ValueError, match="--judge_framing must be one of user, neutral"):
        StyleEvalArgs(judge_framing="referee").check()
    with pytest.raises(ValueError, match="--tie_margin must be >= 0, got -0.1"):
        OnlineRunConfig(tie_margin=-0.1)


def test_the_objective_checks_its_options_against_the_one_table():
    """ObjectiveOptions and Teacher, built directly, refuse what every config refuses, in the same words; their
    rows are RANGES' rows (sdpo_objective.OBJECTIVE_RANGES, taken in whole)."""
    import dataclasses
    import typing
    from typing import Optional

    import torch

    from auxiliary.runtime.option_groups import RANGES
    from sdpo_objective import OBJECTIVE_RANGES, ObjectiveOptions, Teacher

    assert all(RANGES[name] == row for name, row in OBJECTIVE_RANGES.items())
    # resolved hints, not f.type: that is a string until the flag parser resolves it in place (suite order)
    hints = typing.get_type_hints(ObjectiveOptions)
    numeric = {f.name for f in dataclasses.fields(ObjectiveOptions) if hints[f.name] in (int, float, Optional[int])}
    assert numeric == set(OBJECTIVE_RANGES)
    for overrides, message in (({"divergence_alpha": 1.5}, "--divergence_alpha must be in [0, 1], got 1.5"),
                               ({"teacher_ema_rate": 0.0}, "--teacher_ema_rate must be in (0, 1], got 0.0"),
                               ({"signal_clip": -0.5}, "--signal_clip must be >= 0, got -0.5"),
                               ({"beta": float("inf")}, "--beta must be a finite number, got inf")):
        with pytest.raises(ValueError) as caught:
            ObjectiveOptions(**overrides)
        assert str(caught.value) == message
        with pytest.raises(ValueError) as caught:
            OnlineSDPOConfig(**overrides)
        assert str(caught.value) == message
    with pytest.raises(ValueError) as caught:
        Teacher(torch.nn.Linear(2, 2), "ema", ema_rate=1.5)
    assert str(caught.value) == "--teacher_ema_rate must be in (0, 1], got 1.5"


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": -5}, "--max_steps must be >= 1, or -1 (no limit: --num_epochs decides), got -5"),
    ({"max_steps": 0}, "--max_steps must be >= 1, or -1 (no limit: --num_epochs decides), got 0"),
    ({"num_epochs": 0.0}, "--num_epochs must be > 0, got 0.0"),
    ({"grad_accum": 0}, "--grad_accum must be >= 1, got 0"),
    ({"batch_size": 0}, "--batch_size must be >= 1, got 0"),
    ({"max_completion_length": 0}, "--max_completion_length must be >= 1, got 0"),
    ({"warmup_ratio": 1.0}, "--warmup_ratio must be in [0, 1), got 1.0"),
    ({"save_steps": -1}, "--save_steps must be >= 1, got -1"),
    ({"save_total_limit": -1}, "--save_total_limit must be >= 0, got -1"),
    ({"dataloader_num_workers": -2}, "--dataloader_num_workers must be >= 0, got -2"),
])
def test_offline_counts_below_their_range_are_refused(overrides, message):
    from offline_sdpo.main_offline_sft import OfflineSFTArguments

    for arguments in (OfflineSDPOArguments, OfflineSFTArguments):
        with pytest.raises(ValueError) as caught:
            arguments(**overrides)
        assert str(caught.value) == message
    assert OfflineSDPOArguments(max_steps=-1).max_steps == -1  # transformers' "no limit" stays allowed


def test_offline_max_steps_below_minus_one_stops_before_anything_is_written(tmp_path, capsys):
    from offline_sdpo.main_offline_sdpo import BadInput, main

    out = tmp_path / "out"
    with pytest.raises(BadInput) as caught:
        main(["--train_jsonl", str(REPO / "data" / "samples" / "interactions.jsonl"), "--output_dir", str(out),
              "--max_steps", "-5"])
    assert caught.value.line == "error: --max_steps must be >= 1, or -1 (no limit: --num_epochs decides), got -5"
    assert not out.exists()


def test_every_numeric_flag_of_every_entry_point_has_a_range():
    """A count without a row passed any value (offline --max_steps -5 trained an epoch; chat --undo_depth 0 failed
    only after the model had loaded)."""
    import dataclasses
    import typing
    from typing import Optional

    from auxiliary.eval_checkpoints import EvalCheckpointsArgs
    from auxiliary.eval_incontext_oracle import OracleArgs
    from auxiliary.evals.benchmarks import BenchmarkArgs
    from auxiliary.filter_followups import FilterFollowupsArgs
    from auxiliary.runtime.option_groups import RANGES
    from auxiliary.sdpo_signal_analysis import SignalAnalysisArgs
    from chat_sdpo import ChatConfig
    from offline_sdpo.main_offline_sft import OfflineSFTArguments
    from online_sdpo_updater_config import OnlineRunConfig

    numbers = (int, float, Optional[int], Optional[float])
    for config in (OnlineSDPOConfig, OnlineRunConfig, OfflineSDPOArguments, OfflineSFTArguments, ChatConfig,
                   EvalCheckpointsArgs, OracleArgs, FilterFollowupsArgs, SignalAnalysisArgs, BenchmarkArgs):
        hints = typing.get_type_hints(config)
        without = [f.name for f in dataclasses.fields(config) if hints[f.name] in numbers and f.name not in RANGES]
        assert without == [], f"{config.__name__}: no range for {without}"


PREPROCESS = REPO / "tests" / "fixtures" / "preprocess"


@pytest.mark.parametrize("script, args, message", [
    ("preprocess_tldr_dataset", ["--max_post_chars", "-1"], "--max_post_chars must be >= 1, or 0 (no limit), got -1"),
    ("preprocess_helpsteer", ["--max_prompt_chars", "-1"], "--max_prompt_chars must be >= 1, or 0 (no limit), got -1"),
    ("preprocess_helpsteer", ["--max_response_chars", "-5"],
     "--max_response_chars must be >= 1, or 0 (no limit), got -5"),
    ("preprocess_chat_logs", ["--max_completion_chars", "-1"],
     "--max_completion_chars must be >= 1, or 0 (no limit), got -1"),
    ("preprocess_wildchat", ["--max_turn_chars", "-3"], "--max_turn_chars must be >= 1, or 0 (no limit), got -3"),
    ("preprocess_wildfeedback", ["--max_user_response_chars", "-1"],
     "--max_user_response_chars must be >= 1, or 0 (no limit), got -1"),
    # a history of no message and a cap of none dropped every interaction
    ("preprocess_wildchat", ["--max_history_messages", "0"], "--max_history_messages must be >= 1, got 0"),
    ("preprocess_chat_logs", ["--max_interactions", "0"], "--max_interactions must be >= 1, got 0"),
])
def test_data_preparation_refuses_negative_lengths_before_anything_is_written(tmp_path, monkeypatch, capsys, script,
                                                                             args, message):
    """The preprocessors' length limits are rows of the one table too: one line naming the flag, exit 2, nothing
    written (a negative --max_post_chars or a --max_*_chars of preprocess_chat_logs used to run)."""
    import importlib

    from auxiliary.data.preprocess_common import run_cli

    out = tmp_path / "out"
    files = {"preprocess_tldr_dataset": ["--dataset", PREPROCESS / "tldr", "--out_dir", out],
             "preprocess_helpsteer": ["--dataset", PREPROCESS / "helpsteer2", "--out_dir", out],
             "preprocess_chat_logs": ["--input", PREPROCESS / "chat_logs" / "logs.jsonl", "--out", out / "i.jsonl"],
             "preprocess_wildchat": ["--dataset", PREPROCESS / "wildchat" / "train.jsonl", "--out_dir", out],
             "preprocess_wildfeedback": ["--dataset", PREPROCESS / "wildfeedback" / "wildfeedback.json",
                                         "--out_dir", out]}[script]
    monkeypatch.chdir(tmp_path)
    code = run_cli(importlib.import_module(f"auxiliary.{script}").main, [*map(str, files), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []
