"""Every preset of the paper's experiments (configs/paper/) loads through its entry point with --print_config,
and holds the settings the paper's runs used."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    "online_helpsteer2.yaml": "eval_online_sdpo.py",
    "online_tldr.yaml": "eval_online_sdpo.py",
    "flip.yaml": "eval_online_sdpo.py",
    "sequential.yaml": "eval_online_sdpo.py",
    "incontext_oracle.yaml": "auxiliary/eval_incontext_oracle.py",
    "signal_analysis.yaml": "auxiliary/sdpo_signal_analysis.py",
    "offline_wildfeedback.yaml": "offline_sdpo/main_offline_sdpo.py",
    "offline_wildchat.yaml": "offline_sdpo/main_offline_sdpo.py",
    "offline_sft_wildfeedback.yaml": "offline_sdpo/main_offline_sft.py",
}


def print_config(preset: str) -> dict:
    """The entry point's main(["--config", preset, "--print_config"]) in this process: the YAML it prints."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(PRESETS[preset].removesuffix(".py").replace("/", "."))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
        module.main(["--config", str(REPO / "configs" / "paper" / preset), "--print_config"])
    assert exited.value.code == 0, printed.getvalue()[-2000:]
    return yaml.safe_load(printed.getvalue())


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        configs = {preset: print_config(preset) for preset in PRESETS}
    assert list(folder.iterdir()) == []  # --print_config touches nothing
    return configs


def flat(config: dict) -> dict:
    """--print_config prints one mapping per config class: merge them."""
    merged = {}
    for value in config.values():
        merged.update(value if isinstance(value, dict) else {})
    return merged or config


def test_every_preset_under_configs_paper_is_tested():
    assert sorted(p.name for p in (REPO / "configs" / "paper").glob("*.yaml")) == sorted(PRESETS)


def test_online_presets_hold_the_papers_settings(resolved):
    for name in ("online_helpsteer2.yaml", "online_tldr.yaml", "flip.yaml", "sequential.yaml"):
        config = flat(resolved[name])
        assert (config["model"], config["use_lora"], config["lora_r"], config["lora_alpha"],
                config["lora_dropout"]) == \
            ("Qwen/Qwen3-8B", True, 256, 512, 0.0)
        assert config["lora_target_modules"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        assert config["use_vllm"] and config["user_simulator"] == config["judge"] == "vllm"
        assert config["user_model_name_or_path"] == config["judge_model"] == "Qwen/Qwen3-32B"
        assert config["max_new_tokens"] == config["eval_max_new_tokens"] == config["max_prompt_tokens"] == 2048
        assert config["max_checkpoints"] == 0 and config["adam_epsilon"] == 1e-6
    for name in ("online_helpsteer2.yaml", "online_tldr.yaml"):
        assert flat(resolved[name])["checkpoint_every"] == 1
    assert "tldr_prompts_unique" in flat(resolved["online_tldr.yaml"])["train_jsonl"]


def test_flip_and_sequential_presets_hold_the_papers_schedules():
    from auxiliary.feedback.schedule import StyleSchedule

    flip = yaml.safe_load((REPO / "configs" / "paper" / "flip.yaml").read_text())
    sequential = yaml.safe_load((REPO / "configs" / "paper" / "sequential.yaml").read_text())
    # a flip after 250 interactions; three preferences of 500 interactions each
    assert [(p.style, p.interactions) for p in StyleSchedule.parse(flip["style_schedule"]).phases] == [
        ("no_lists", 250), ("more_lists", 250)]
    assert [p.interactions for p in StyleSchedule.parse(sequential["style_schedule"]).phases] == [500, 500, 500]
    assert len(StyleSchedule.parse(sequential["style_schedule"]).styles) == 3


def test_offline_presets_hold_the_paper_trainers_settings(resolved):
    for name in ("offline_wildfeedback.yaml", "offline_wildchat.yaml"):
        config = flat(resolved[name])
        assert (config["lr"], config["batch_size"], config["grad_accum"], config["num_epochs"]) == (2e-6, 4, 8, 2)
        assert (config["warmup_ratio"], config["lr_scheduler_type"], config["max_grad_norm"]) == (0.05, "cosine", 10.0)
        lengths = (config["max_context_length"], config["max_completion_length"], config["ignore_first_k"])
        assert lengths == (2048, 2048, 2)
        assert config["gradient_checkpointing"] is True and config["optim"] == "auto"


def test_the_sft_baseline_preset_shares_every_applicable_setting_of_the_sdpo_one(resolved):
    sft, sdpo = flat(resolved["offline_sft_wildfeedback.yaml"]), flat(resolved["offline_wildfeedback.yaml"])
    assert "loss_mode" not in sft and "ignore_first_k" not in sft  # the objective's settings do not apply to SFT
    assert {key: sdpo[key] for key in sft} == sft


def test_oracle_and_signal_presets(resolved):
    oracle = flat(resolved["incontext_oracle.yaml"])
    styles = oracle["eval_styles"] if isinstance(oracle["eval_styles"], list) else oracle["eval_styles"].split()
    assert len(styles) == 8 and all(s.count("_") == 2 for s in styles)
    assert flat(resolved["signal_analysis.yaml"])["n_cases"] == 24
