"""online_sdpo_updater_config.online_rules: every rule between the online flags, checked before anything is made."""
import hashlib
import random

import pytest

import eval_online_sdpo
from auxiliary.runtime.seeds import derive_seed, seeded_rng
from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig, check_online_rules, online_rules


@pytest.mark.parametrize("sdpo, run, processes, message", [
    ({}, dict(style_schedule="concise:3,detailed:2", interactions_per_update=2), 1, "every phase but the last"),
    ({}, dict(style_schedule="concise:2", users="concise,detailed"), 1, "are exclusive"),
    ({}, dict(users="concise,detailed", per_user_adapters=True, interactions_per_update=2), 1,
     "needs --interactions_per_update 1"),
    ({}, dict(eval_every=3, interactions_per_update=2), 1, "--eval_every 3 must be a multiple"),
    ({}, dict(per_user_adapters=True), 1, "--per_user_adapters needs --users"),
    ({}, dict(phase_baseline="snapshot"), 1, "needs --style_schedule"),
    (dict(checkpoint_every=3), dict(interactions_per_update=2, eval_every=2), 1, "--checkpoint_every 3"),
    ({}, dict(users="concise,detailed", per_user_adapters=True), 1, "needs --use_lora"),
    (dict(use_lora=True, use_vllm=True), dict(users="concise,detailed", per_user_adapters=True), 1,
     "--per_user_adapters needs generation without --use_vllm"),
    (dict(use_lora=True), dict(users="concise,detailed", per_user_adapters=True, resume=True, output_dir="x"), 1,
     "without --save_checkpoints / --resume"),
    (dict(use_lora=True), dict(users="concise,detailed", per_user_adapters=True, eval_styles="no_lists"), 1,
     "no --eval_styles"),
    ({}, dict(overlap_generation=True), 2, "--overlap_generation needs a single process"),
    (dict(use_vllm=True), dict(overlap_generation=True), 1, "--overlap_generation needs generation without"),
    ({}, dict(overlap_generation=True, resume=True, output_dir="x"), 1, "--overlap_generation needs a run without"),
    ({}, dict(interactions_per_update=3, eval_every=3), 2, "2 processes need --interactions_per_update a multiple"),
    (dict(beta=0.1), dict(interactions_per_update=2, eval_every=2), 2, "2 processes need --beta 0"),
    ({}, dict(resume=True), 1, "--resume needs the run's --output_dir"),
    (dict(use_vllm=True), dict(placebo=True, arms_in_parallel=True), 1, "--arms_in_parallel needs generation without"),
    ({}, dict(placebo=True, arms_in_parallel=True, interactions_per_update=2, eval_every=2), 2,
     "--arms_in_parallel needs a single process"),
])
def test_each_rule_is_one_line(sdpo, run, processes, message, monkeypatch):
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    with pytest.raises(ValueError, match=message) as caught:
        check_online_rules(OnlineSDPOConfig(**sdpo), OnlineRunConfig(**run), processes)
    assert "\n" not in str(caught.value)


def test_default_flags_break_no_rule():
    assert not [message for broken, message in online_rules(OnlineSDPOConfig(), OnlineRunConfig(), 1) if broken]


def test_a_rule_fails_before_the_folder_is_made(tmp_path, capsys):
    # --arms_in_parallel with --use_vllm used to fail only after the folder and the models were made
    out = tmp_path / "run"
    code = eval_online_sdpo.main(["--model", str(tmp_path / "no_model_here"), "--output_dir", str(out), "--placebo",
                                  "--arms_in_parallel", "--use_vllm"])
    assert code == 2 and "--arms_in_parallel needs generation without --use_vllm" in capsys.readouterr().err
    assert not out.exists()


def test_seeds_are_sha256_of_the_parts_joined_by_the_unit_separator():
    digest = hashlib.sha256("1234\x1ftrain\x1f3".encode("utf-8")).digest()
    assert derive_seed(1234, "train", 3) == int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    draw = random.Random(int.from_bytes(hashlib.sha256(b"7\x1fuser-draw\x1f5").digest()[:8], "big")).random()
    assert seeded_rng(7, "user-draw", 5).random() == draw
