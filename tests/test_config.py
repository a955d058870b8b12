"""One source of truth for every setting: shared option groups, alias spellings, --print_config,
and the masking of secrets (not of settings that merely contain "token") in written configs."""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from auxiliary.evals.style_eval import StyleEvalArgs
from auxiliary.runtime.cli import ConfigError, parse_dataclasses
from auxiliary.runtime.option_groups import (ContextOptions, JudgeOptions, LoraOptions, ModelOptions, OptimizerOptions,
                                             VLLMEngineOptions)
from auxiliary.runtime.secrets import public_config
from chat_sdpo import ChatConfig
from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments
from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig
from sdpo_objective import ObjectiveOptions


def fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------- groups

@pytest.mark.parametrize("config", [OnlineSDPOConfig, OfflineSDPOArguments, ChatConfig])
@pytest.mark.parametrize("group", [ObjectiveOptions, ModelOptions, ContextOptions, OptimizerOptions, LoraOptions])
def test_every_config_inherits_the_shared_groups_with_their_help(config, group):
    assert issubclass(config, group)
    for name, f in fields(group).items():
        assert fields(config)[name].metadata["help"], (config.__name__, name)
    assert all(f.metadata.get("help") for f in dataclasses.fields(ObjectiveOptions))


@pytest.mark.parametrize("config, group", [(OnlineRunConfig, JudgeOptions), (StyleEvalArgs, JudgeOptions),
                                           (OnlineSDPOConfig, VLLMEngineOptions), (StyleEvalArgs, VLLMEngineOptions)])
def test_judge_and_generation_engine_settings_are_declared_once(config, group):
    # the online run and both evaluation tools take these from one group: same default, same help
    assert issubclass(config, group)
    for name, f in fields(group).items():
        assert name not in vars(config).get("__annotations__", {}), (config.__name__, name)
        assert (fields(config)[name].default, fields(config)[name].metadata) == (f.default, f.metadata)


def test_the_judge_framing_is_checked_by_every_config_that_has_it():
    with pytest.raises(ValueError, match="--judge_framing must be one of user, neutral, got 'referee'"):
        OnlineRunConfig(judge_framing="referee")
    with pytest.raises(ValueError, match="--judge_framing must be one of user, neutral, got 'referee'"):
        StyleEvalArgs(judge_framing="referee").check()


def test_subclasses_change_defaults_in_one_place():
    offline, online, chat = OfflineSDPOArguments(), OnlineSDPOConfig(), ChatConfig()
    assert (offline.loss_mode, offline.ignore_first_k, offline.lr, offline.model, offline.max_context_length) == \
        ("simple_signal", 2, 2e-6, "Qwen/Qwen3-4B", 2048)
    assert (online.loss_mode, online.ignore_first_k, online.lr, online.model, online.max_context_length) == \
        ("full_distillation", 0, 5e-6, "Qwen/Qwen3-8B", 4096)
    assert (chat.lr, chat.use_lora, chat.lora_dropout, chat.max_new_tokens) == (1e-4, True, 0.0, 256)
    # an override keeps the group's help text unless it gives its own
    assert fields(OfflineSDPOArguments)["loss_mode"].metadata["help"] == fields(ObjectiveOptions)[
        "loss_mode"].metadata["help"]
    assert fields(OfflineSDPOArguments)["lr"].metadata["aliases"] == ["--learning_rate"]


def test_objective_options_come_from_the_group_fields():
    config = OfflineSDPOArguments(center_signal=True, signal_clip=0.5)
    opts = config.objective_options()
    assert opts == ObjectiveOptions(loss_mode="simple_signal", ignore_first_k=2, center_signal=True, signal_clip=0.5)
    with pytest.raises(ValueError, match="negate_signal"):
        OnlineSDPOConfig(negate_signal=True)  # the group's own validation runs for every config


# --------------------------------------------------------------------------- aliases

def test_upstream_spellings_are_flags_and_yaml_keys(tmp_path):
    (cfg,) = parse_dataclasses([OfflineSDPOArguments], ["--learning_rate", "3e-5", "--base_model", "m", "--precision",
                                                        "bf16", "--max_prompt_length", "77"])
    assert (cfg.lr, cfg.model, cfg.dtype, cfg.max_context_length) == (3e-5, "m", "bf16", 77)
    profile = tmp_path / "run.yaml"
    profile.write_text("learning_rate: 4.0e-5\nmodel_name_or_path: from/yaml\n")
    (online, _) = parse_dataclasses([OnlineSDPOConfig, ChatOnly], ["--config", str(profile)])
    assert (online.lr, online.model) == (4e-5, "from/yaml")
    # the flag wins over the YAML, whatever the spelling
    (online, _) = parse_dataclasses([OnlineSDPOConfig, ChatOnly], ["--config", str(profile), "--lr", "1e-6"])
    assert online.lr == 1e-6


@dataclasses.dataclass
class ChatOnly:  # a second dataclass, as eval_online_sdpo.py parses two
    note: str = dataclasses.field(default="", metadata={"help": "unrelated flag"})


def test_an_alias_and_its_name_with_different_values_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="lr"):
        parse_dataclasses([OfflineSDPOArguments], ["--lr", "1e-5", "--learning_rate=2e-5"])
    (cfg,) = parse_dataclasses([OfflineSDPOArguments], ["--lr", "1e-5", "--learning_rate", "1e-5"])  # the same: fine
    assert cfg.lr == 1e-5
    both = tmp_path / "both.yaml"
    both.write_text("base_model: a\nmodel: b\n")
    with pytest.raises(ConfigError, match="model"):
        parse_dataclasses([OfflineSDPOArguments], ["--config", str(both)])


def test_later_config_files_win_and_flags_win_over_all(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("lr: 1.0e-5\nseed: 3\n")
    second.write_text("seed: 4\n")
    (cfg,) = parse_dataclasses([OnlineSDPOConfig], ["--config", str(first), "--config", str(second)])
    assert (cfg.lr, cfg.seed) == (1e-5, 4)
    (cfg,) = parse_dataclasses([OnlineSDPOConfig], ["--config", str(first), "--config", str(second), "--seed", "5"])
    assert cfg.seed == 5


# --------------------------------------------------------------------------- --print_config

def test_print_config_for_eval_online_prints_the_resolved_settings_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import eval_online_sdpo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BASE_WORK", str(tmp_path / "base"))
    profile = tmp_path / "p.yaml"
    profile.write_text("style: concise\nlr: 1.0e-5\n")
    with pytest.raises(SystemExit) as exit_info:
        eval_online_sdpo.main(["--config", str(profile), "--lr", "2e-5", "--model", "no/such-model",
                               "--output_dir", str(tmp_path / "out"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["style"], config["lr"], config["model"], config["judge"], config["max_new_tokens"]) == \
        ("concise", 2e-5, "no/such-model", "rule", 512)
    assert sorted(os.listdir(tmp_path)) == ["p.yaml"]  # no output folder, nothing loaded


def test_print_config_for_offline_main(tmp_path, capsys, monkeypatch):
    from offline_sdpo import main_offline_sdpo

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main_offline_sdpo.main(["--learning_rate", "3e-6", "--output_dir", str(tmp_path / "out"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["lr"], config["loss_mode"], config["ignore_first_k"], config["model"]) == \
        (3e-6, "simple_signal", 2, "Qwen/Qwen3-4B")
    assert "learning_rate" not in config and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- secrets

def test_public_config_masks_secrets_but_keeps_token_counts():
    values = {"max_new_tokens": 96, "max_prompt_tokens": 1024, "eval_max_new_tokens": 64, "tokenizer": "t",
              "api_key": "abc", "hf_token": "x", "wandb_api_key": "y", "db_password": "z", "secret": "s",
              "note": "sk-ant-api03-abcdefghijklmnop", "model": "hf_abcdefghijklmnopqrstuvwxyz",
              "nested": {"api_key": "k", "max_new_tokens": 8}, "empty_api_key": ""}
    masked = public_config(values)
    assert (masked["max_new_tokens"], masked["max_prompt_tokens"], masked["eval_max_new_tokens"],
            masked["tokenizer"]) == \
        (96, 1024, 64, "t")
    for key in ("api_key", "hf_token", "wandb_api_key", "db_password", "secret", "note", "model"):
        assert masked[key] == "***", key
    assert masked["nested"] == {"api_key": "***", "max_new_tokens": 8} and masked["empty_api_key"] == ""
    assert values["api_key"] == "abc"  # the input is left alone


@pytest.mark.parametrize("text, key, expected", [
    ("lr: [1, 2]", "lr", "expected a number, got [1, 2]"),
    ("train_n: 1.5", "train_n", "expected a whole number, got 1.5"),
    ("max_new_tokens: 2.7", "max_new_tokens", "expected a whole number, got 2.7"),
    ("eval_every: true", "eval_every", "expected a whole number, got True"),
    ("hindsight_template: 7", "hindsight_template", "expected text, got 7 (quote it: '7')"),
    ("output_dir: 5", "output_dir", "expected text, got 5 (quote it: '5')"),
    ("train_jsonl: [a, b]", "train_jsonl", "expected text, got ['a', 'b']"),
    ("placebo: 1", "placebo", "expected true or false, got 1"),
    ("placebo_texts: [ok, 3]", "placebo_texts", "in the list: expected text, got 3 (quote it: '3')"),
    ("placebo_texts: 3", "placebo_texts", "expected a list, got 3"),
    ("learning_rate: abc", "lr", "expected a number, got 'abc'"),  # an alias spelling is checked as its field
])
def test_yaml_values_of_the_wrong_type_are_one_line_naming_file_line_and_key(tmp_path, text, key, expected):
    from auxiliary.runtime.cli import ConfigError, parse_dataclasses

    profile = tmp_path / "run.yaml"
    profile.write_text(f"style: concise\n{text}\n")
    with pytest.raises(ConfigError) as refused:
        parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), ["--config", str(profile)])
    assert str(refused.value) == f"{profile}:2: {key}: {expected}"


def test_yaml_values_of_the_right_type_pass_and_a_duplicated_key_is_refused(tmp_path):
    from auxiliary.runtime.cli import ConfigError, parse_dataclasses

    profile = tmp_path / "run.yaml"
    profile.write_text("lr: 5e-6\ntrain_n: 4\noutput_dir: null\nplacebo: true\nplacebo_texts: [ok]\nlora_alpha: 16\n")
    sdpo, run = parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), ["--config", str(profile)])
    # 5e-6 without a dot is text to YAML: converted as the flag would be
    assert (sdpo.lr, run.train_n, run.output_dir, run.placebo, run.placebo_texts) == (5e-6, 4, None, True, ["ok"])
    profile.write_text("lr: 0.001\ntrain_n: 4\nlr: 0.01\n")
    with pytest.raises(ConfigError, match=rf"^{profile}:3: key 'lr' is given twice \(also on line 1\); keep one$"):
        parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), ["--config", str(profile)])


@pytest.mark.parametrize("kind", ["folder", "not UTF-8", "invalid YAML"])
def test_an_unreadable_config_is_one_line_naming_the_file(tmp_path, kind):
    from auxiliary.runtime.cli import ConfigError, parse_dataclasses

    profile = tmp_path / "run.yaml"
    if kind == "folder":
        profile.mkdir()
        expected = f"config file {profile} is a folder; --config takes a YAML file"
    elif kind == "not UTF-8":
        profile.write_bytes(b"style: concise\nlr: \xff\n")
        expected = f"{profile}:2: not UTF-8 text (byte 0xff); save the config as UTF-8"
    else:
        profile.write_text("style: concise\nlr: [1, 2\ntrain_n: 3\n")
        expected = (f"{profile}:3:8: invalid YAML: while parsing a flow sequence "
                    "expected ',' or ']', but got ':'")
    with pytest.raises(ConfigError) as refused:
        parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), ["--config", str(profile)])
    assert str(refused.value) == expected and "\n" not in str(refused.value)
