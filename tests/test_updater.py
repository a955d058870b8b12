"""OnlineSDPOUpdater: generation, updates, LoRA, non-finite guard, checkpoint / resume exactness."""
import json

import pytest
import torch

from online_sdpo_updater import OnlineSDPOUpdater, latest_checkpoint, list_checkpoints
from online_sdpo_updater_config import OnlineSDPOConfig
from reliability_helpers import tiny_updater

MESSAGES = [{"role": "user", "content": "Write a short email to my manager."}]
OTHER = [{"role": "user", "content": "Give me three tips for better sleep."}]


def make_updater(tokenizer, tmp_path=None, seed=0, **overrides):
    values = dict(lr=1e-3, max_new_tokens=10, loss_mode="simple_signal", seed=seed)
    if tmp_path is not None:
        values["checkpoint_dir"] = str(tmp_path / "checkpoints")
    return tiny_updater(tokenizer, **{**values, **overrides})


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_generate_returns_text_and_ids_and_batching_matches_single(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer)
    batched = updater.generate([MESSAGES, OTHER, MESSAGES + [{"role": "assistant", "content": "Sure"},
                                                             {"role": "user", "content": "thanks"}]], temperature=0)
    singles = [updater.generate([m], temperature=0)[0] for m in (MESSAGES, OTHER)]
    assert [r.ids for r in batched[:2]] == [s.ids for s in singles]
    for reply in batched:
        assert reply.ids and isinstance(reply.text, str)
        assert reply.finished == (reply.ids[-1] == tiny_tokenizer.eos_token_id)
        assert len(reply.ids) <= 10
        assert reply.text == tiny_tokenizer.decode(reply.ids, skip_special_tokens=True).strip()


def test_two_steps_change_all_trainable_parameters(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer)
    before = snapshot(updater.model)
    reply = updater.generate([MESSAGES], seed=1)[0]
    first = updater.train_step(MESSAGES, reply.ids, "Use a formal tone.")
    second = updater.train_step(MESSAGES, reply.ids, "Use a formal tone.")
    assert updater.step == 2 and second["step"] == 2
    for key in ("loss", "signal_mean", "signal_std", "logp_x", "logp_xo", "grad_norm", "tokens", "seconds"):
        assert key in first
    assert first["tokens"] == len(reply.ids)
    changed = [n for n, p in updater.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and any("layers.0" in n for n in changed)


def test_lora_changes_only_adapter_parameters(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                           lora_target_modules="q_proj,v_proj", loss_mode="full_distillation", lr=1e-2)
    before = snapshot(updater.model)
    reply = updater.generate([MESSAGES], seed=1)[0]
    for _ in range(2):
        updater.train_step(MESSAGES, reply.ids, "Use a formal tone.")
    changed = {n for n, p in updater.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert changed == {n for n in before if "lora_B" in n or "lora_A" in n}


def test_train_steps_per_example_takes_k_optimizer_steps(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer, train_steps_per_example=3)
    reply = updater.generate([MESSAGES], seed=1)[0]
    metrics = updater.train_step(MESSAGES, reply.ids, "No emojis please.")
    state = updater.optimizer.state_dict()["state"]
    assert updater.step == 1
    assert all(int(s["step"]) == 3 for s in state.values())
    assert metrics["loss_first"] != metrics["loss"]


def test_non_finite_step_is_skipped_and_leaves_state_untouched(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer)
    reply = updater.generate([MESSAGES], seed=1)[0]
    updater.train_step(MESSAGES, reply.ids, "ok")
    with torch.no_grad():
        updater.model.model.norm.weight[0] = float("nan")
    before = snapshot(updater.model)
    optimizer_before = {k: {n: t.clone() for n, t in v.items()} for k, v in updater.optimizer.state.items()}
    metrics = updater.train_step(MESSAGES, reply.ids, "ok")
    assert metrics["skipped"] is True and updater.skipped_nonfinite == 1
    for name, param in updater.model.named_parameters():
        assert torch.equal(param, before[name]) or (torch.isnan(param).any() and name == "model.norm.weight")
    for key, values in updater.optimizer.state.items():
        for name, tensor in values.items():
            assert torch.equal(tensor, optimizer_before[key][name])


@pytest.mark.parametrize("use_lora", [False, True])
def test_save_load_step_equals_uninterrupted(tiny_tokenizer, tmp_path, use_lora):
    extra = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2) if use_lora else {}
    straight = make_updater(tiny_tokenizer, tmp_path / "a", **extra)
    replies = [straight.generate([MESSAGES], seed=s)[0] for s in (1, 2, 3)]
    straight.train_step(MESSAGES, replies[0].ids, "Use a formal tone.")
    path = straight.save_checkpoint()
    straight.train_step(MESSAGES, replies[1].ids, "Be brief.")
    after_two = snapshot(straight.model)
    sample_after = straight.generate([OTHER])[0].ids  # consumes the RNG restored below

    resumed = make_updater(tiny_tokenizer, tmp_path / "b", **extra)
    resumed.load_checkpoint(path)
    assert resumed.step == 1
    resumed.train_step(MESSAGES, replies[1].ids, "Be brief.")
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, after_two[name]), name
    assert resumed.generate([OTHER])[0].ids == sample_after


def test_checkpoint_contents_pruning_and_latest(tiny_tokenizer, tmp_path):
    updater = make_updater(tiny_tokenizer, tmp_path, checkpoint_every=1, max_checkpoints=2)
    reply = updater.generate([MESSAGES], seed=1)[0]
    for _ in range(3):
        updater.train_step(MESSAGES, reply.ids, "ok")
    folder = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["step_000002", "step_000003"]
    assert latest_checkpoint(folder).name == "step_000003"
    newest = latest_checkpoint(folder)
    for name in ("optimizer.pt", "rng.pt", "updater_state.json", "config.json", "model/config.json",
                 "model/tokenizer_config.json"):
        assert (newest / name).exists(), name
    assert json.loads((newest / "updater_state.json").read_text())["step"] == 3
    assert json.loads((newest / "config.json").read_text())["lr"] == 1e-3
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        updater.load_checkpoint(tmp_path)


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="followup"):
        OnlineSDPOConfig(hindsight_template="nothing")
    with pytest.raises(ValueError, match="loss_mode"):
        OnlineSDPOConfig(loss_mode="dpo")


def test_adam_epsilon_reaches_the_optimizers(tiny_model, tiny_tokenizer):
    from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments, build_training_arguments
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model="tiny", device="cpu", adam_epsilon=3e-7), tiny_model,
                                tiny_tokenizer)
    assert updater.optimizer.defaults["eps"] == 3e-7
    assert OnlineSDPOConfig().adam_epsilon == 1e-6 == OfflineSDPOArguments().adam_epsilon  # the paper's
    offline = OfflineSDPOArguments(train_jsonl="x.jsonl", output_dir="/tmp/unused", adam_epsilon=2e-7)
    assert build_training_arguments(offline, "fp32", "adamw_torch").adam_epsilon == 2e-7
    with pytest.raises(ValueError, match="--adam_epsilon must be > 0"):
        OnlineSDPOConfig(adam_epsilon=0.0)


@pytest.mark.parametrize("teacher", ["live", "ema"])
def test_a_copy_of_a_lora_policy_is_trained_as_it_is_not_wrapped_twice(tiny_tokenizer, teacher):
    """The placebo arm: a deep copy of the first updater's (LoRA-wrapped) model handed to a second updater."""
    import copy

    first = make_updater(tiny_tokenizer, use_lora=True, lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj",
                         teacher=teacher)
    twin = OnlineSDPOUpdater(first.config, model=copy.deepcopy(first.model), tokenizer=tiny_tokenizer)
    lora_names = lambda m: sorted(n for n, _ in m.named_parameters() if "lora_" in n)  # noqa: E731
    assert lora_names(twin.model) == lora_names(first.model)
    assert sorted(twin.trainable_parameters()) == sorted(first.trainable_parameters())
    reply = first.generate([MESSAGES], seed=1)[0]
    assert first.train_step(MESSAGES, reply.ids, "Shorter.")["loss"] == twin.train_step(MESSAGES, reply.ids,
                                                                                          "Shorter.")["loss"]
