"""The paper repository's Python calls on OnlineSDPOUpdater and its config field names.

generate_response / generate_responses_batch return text, train_step takes the reply as text
(tokenized once, EOS appended) and gives the same update as the sampled ids, save_checkpoint(tag)
writes under checkpoint_dir, and OnlineSDPOConfig takes model_name_or_path, learning_rate and
hindsight_block_template with its {follow_up} placeholder.
"""
import pytest
import torch

from auxiliary.runtime.cli import parse_dataclasses
from auxiliary.runtime.tiny_model import build_tiny_model
from online_sdpo_updater import OnlineSDPOUpdater, list_checkpoints
from online_sdpo_updater_config import OnlineSDPOConfig
from sdpo_objective import hindsight_messages

MESSAGES = [{"role": "user", "content": "Write a short email to my manager."}]
OTHER = [{"role": "user", "content": "Give me three tips for better sleep."}]


def make_updater(tokenizer, **overrides):
    values = dict(model_name_or_path="tiny", learning_rate=1e-3, max_new_tokens=8, loss_mode="simple_signal",
                  temperature=0.0, seed=0)
    values.update(overrides)
    return OnlineSDPOUpdater(OnlineSDPOConfig(**values), build_tiny_model(tokenizer, seed=0), tokenizer)


def test_generate_response_and_batch_return_the_replies_as_text(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer)
    replies = updater.generate([MESSAGES, OTHER])
    assert updater.generate_responses_batch([MESSAGES, OTHER]) == [r.text for r in replies]
    assert updater.generate_response(OTHER) == replies[1].text


def test_train_step_with_text_equals_train_step_with_its_ids(tiny_tokenizer):
    text = "Dear manager, I will be late today."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    by_text, by_ids = make_updater(tiny_tokenizer), make_updater(tiny_tokenizer)
    assert by_text.response_ids_from_text(text) == ids
    metrics_text = by_text.train_step(MESSAGES, text, "Be more formal.")
    metrics_ids = by_ids.train_step(MESSAGES, ids, "Be more formal.")
    assert metrics_text["loss"] == metrics_ids["loss"] and metrics_text["tokens"] == len(ids)
    for (name, a), (_, b) in zip(by_text.model.named_parameters(), by_ids.model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="assistant response is empty"):
        by_text.train_step(MESSAGES, "  ", "Be more formal.")


def test_save_checkpoint_with_a_tag_writes_under_checkpoint_dir_and_is_never_pruned(tiny_tokenizer, tmp_path):
    updater = make_updater(tiny_tokenizer, checkpoint_dir=str(tmp_path / "ckpts"), max_checkpoints=1)
    reply = updater.generate([MESSAGES])[0]
    updater.train_step(MESSAGES, reply.ids, "Shorter.")
    tagged = updater.save_checkpoint("final")
    assert tagged == tmp_path / "ckpts" / "final" and (tagged / "updater_state.json").exists()
    for _ in range(2):
        updater.train_step(MESSAGES, reply.ids, "Shorter.")
        updater.save_checkpoint()  # step_N, pruned to the newest one
    assert [p.name for p in list_checkpoints(tmp_path / "ckpts")] == ["step_000003"]
    assert (tmp_path / "ckpts" / "final").is_dir()
    restored = make_updater(tiny_tokenizer, checkpoint_dir=str(tmp_path / "ckpts"))
    restored.load_checkpoint(tagged)
    assert restored.step == 1
    # a path with a folder part is used as given, as before
    elsewhere = updater.save_checkpoint(tmp_path / "other" / "final")
    assert elsewhere == tmp_path / "other" / "final"


def test_config_takes_the_paper_repository_field_names():
    template = "\n\n(The user later said: {follow_up})"
    config = OnlineSDPOConfig(model_name_or_path="tiny", learning_rate=2e-5, hindsight_block_template=template)
    assert (config.model, config.lr) == ("tiny", 2e-5)
    assert config.hindsight_template == "\n\n(The user later said: {followup})"
    xo = hindsight_messages(MESSAGES, "Too long.", config.hindsight_template)
    assert xo[-1]["content"].endswith("(The user later said: Too long.)")
    with pytest.raises(TypeError, match="learning_rate=0.1 and lr=0.2 set the same setting"):
        OnlineSDPOConfig(model="tiny", learning_rate=0.1, lr=0.2)
    (parsed,) = parse_dataclasses((OnlineSDPOConfig,), ["--model_name_or_path", "tiny", "--learning_rate", "3e-5",
                                                        "--hindsight_block_template", template])
    assert (parsed.model, parsed.lr, parsed.hindsight_template) == ("tiny", 3e-5, config.hindsight_template)
    with pytest.raises(ValueError, match="must contain the placeholder"):
        OnlineSDPOConfig(model="tiny", hindsight_block_template="no placeholder")
