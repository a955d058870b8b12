"""Offline SDPO: record validation, the collator's token ids, and the metric bookkeeping (no training)."""
import json
import math
from pathlib import Path

import pytest
import torch

from auxiliary.runtime.io_utils import DataError
from offline_sdpo.offline_sdpo_trainer import (OfflineSDPOTrainer, SDPOCollator, accumulate_stats, load_interactions,
                                               metrics_from_sums, new_sums, normalize_record)
from sdpo_objective import (ObjectiveOptions, build_scoring_batch, compute_signal, hindsight_messages,
                            render_context_ids, sdpo_loss)

FIXTURE = Path(__file__).parent / "fixtures" / "offline" / "interactions.jsonl"


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello!", "user_response": "Shorter."}


# --------------------------------------------------------------------------- records

def test_fixture_loads_with_both_message_formats_and_counts_skips():
    records, summary = load_interactions(FIXTURE)
    assert (summary.read, summary.kept) == (10, 8)
    assert dict(summary.skipped) == {"empty completion": 1, "empty user_response": 1}
    assert "8 kept" in summary.describe() and "1 empty completion" in summary.describe()
    # line 2 uses from/value (human/gpt) for prompt, completion and follow-up
    assert records[1]["prompt"] == [{"role": "user", "content": "Give me three tips for better sleep."}]
    assert records[1]["completion"].startswith("Sure! 1.")
    assert records[1]["user_response"] == "No lists please, just one sentence."
    # line 3 keeps its system prompt; line 4 is multi-turn with a gpt turn
    assert [m["role"] for m in records[2]["prompt"]] == ["system", "user"]
    assert [m["role"] for m in records[3]["prompt"]] == ["user", "assistant", "user"]
    # line 6: a bare string prompt becomes one user message
    assert records[5]["prompt"] == [{"role": "user", "content": "Write a haiku about a lazy dog."}]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"prompt": [oops'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_interactions(path)


@pytest.mark.parametrize("broken, message", [
    ({k: v for k, v in GOOD.items() if k != "user_response"}, "missing field.*user_response"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, "missing field.*prompt"),
    ({**GOOD, "prompt": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ({**GOOD, "prompt": [{"role": "assistant", "content": "x"}]}, "no user message"),
    ({**GOOD, "completion": 42}, "'completion' must be a string or a message"),
])
def test_bad_records_name_their_line_and_field(tmp_path, broken, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, broken])
    with pytest.raises(DataError, match=rf"data\.jsonl:2: .*{message}"):
        load_interactions(path)


def test_only_empty_records_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [{**GOOD, "completion": " "}])
    with pytest.raises(DataError, match="no usable interaction records"):
        load_interactions(path)


# --------------------------------------------------------------------------- collator

def test_collator_ids_match_the_objective_module(tiny_tokenizer):
    record = {"prompt": [{"from": "human", "value": "Give me a recipe."}],
              "completion": {"from": "gpt", "value": "Boil pasta."},
              "user_response": "Use a formal tone."}
    out = SDPOCollator(tiny_tokenizer)([record])
    messages = normalize_record(record)["prompt"]
    assert out["x_ids"] == [render_context_ids(tiny_tokenizer, messages)]
    assert out["xo_ids"] == [render_context_ids(tiny_tokenizer, hindsight_messages(messages, "Use a formal tone."))]
    eos = tiny_tokenizer.eos_token_id
    assert out["completion_ids"] == [tiny_tokenizer("Boil pasta.", add_special_tokens=False)["input_ids"] + [eos]]
    assert out["has_eos"] == [True] and out["prompt_truncated"] == [False]


def test_collator_truncation_and_no_double_eos(tiny_tokenizer):
    eos_text, eos = tiny_tokenizer.eos_token, tiny_tokenizer.eos_token_id
    text_ids = tiny_tokenizer("Sure! Here is a recipe.", add_special_tokens=False)["input_ids"]
    assert len(text_ids) > 3
    collator = SDPOCollator(tiny_tokenizer, max_prompt_length=5, max_completion_length=3)
    long = collator.encode({**GOOD, "completion": "Sure! Here is a recipe."})
    assert long["completion_ids"] == text_ids[:3] and long["has_eos"] is False  # a cut reply did not end there
    full_x = render_context_ids(tiny_tokenizer, [{"role": "user", "content": "Hi"}])
    assert long["x_ids"] == full_x[-5:]  # cut from the LEFT: the assistant header survives
    assert long["prompt_truncated"] is True
    already = SDPOCollator(tiny_tokenizer).encode({**GOOD, "completion": "OK" + eos_text})
    assert already["completion_ids"][-1] == eos and already["completion_ids"][-2] != eos


# --------------------------------------------------------------------------- metrics

def test_metrics_from_sums_hand_computed():
    sums = new_sums()
    stats = {"tokens": 4, "logp_x": -2.0, "logp_xo": -1.5, "signal_per_sequence": [torch.tensor([1.0, 2.0, 3.0]),
                                                                                  torch.tensor([-1.0])]}
    accumulate_stats(sums, stats, has_eos=[True, False], prompt_truncated=[False, True])
    stats2 = {"tokens": 2, "logp_x": -5.0, "logp_xo": -4.0, "signal_per_sequence": [torch.tensor([0.0, 1.0])]}
    accumulate_stats(sums, stats2, has_eos=[True])
    metrics = metrics_from_sums(sums)
    values = [1.0, 2.0, 3.0, -1.0, 0.0, 1.0]
    assert metrics["signal_mean"] == pytest.approx(6 / 6)
    sample_var = sum((v - 1.0) ** 2 for v in values) / 5
    assert metrics["signal_std"] == pytest.approx(math.sqrt(sample_var))
    assert metrics["signal_abs_mean"] == pytest.approx(8 / 6)
    assert metrics["signal_seq_mean"] == pytest.approx((2.0 - 1.0 + 0.5) / 3)  # mean over replies of per-reply means
    assert metrics["eos_signal"] == pytest.approx((3.0 + 1.0) / 2)  # last token of the two replies with EOS
    assert metrics["logp_x"] == pytest.approx((-2.0 * 4 - 5.0 * 2) / 6)
    assert metrics["logp_xo"] == pytest.approx((-1.5 * 4 - 4.0 * 2) / 6)
    assert metrics["completion_tokens"] == pytest.approx(2.0)
    assert metrics["prompt_truncated_frac"] == pytest.approx(1 / 3)
    assert "ref_kl" not in metrics and metrics_from_sums(new_sums()) == {}
    assert "end_signal_mean" not in metrics


def test_end_signal_mean_is_pooled_over_micro_batches_by_tokens():
    sums = new_sums()
    accumulate_stats(sums, {"tokens": 3, "logp_x": 0.0, "logp_xo": 0.0, "end_signal_mean": 0.5,
                            "signal_per_sequence": [torch.zeros(3)]}, has_eos=[False])
    accumulate_stats(sums, {"tokens": 1, "logp_x": 0.0, "logp_xo": 0.0, "end_signal_mean": -1.0,
                            "signal_per_sequence": [torch.zeros(1)]}, has_eos=[False])
    assert metrics_from_sums(sums, with_end_signal=True)["end_signal_mean"] == pytest.approx((1.5 - 1.0) / 4)


def test_trainer_loss_and_logged_eos_signal_match_direct_computation(tiny_tokenizer, tiny_model, tmp_path):
    """compute_loss == sdpo_loss on hand-built batches; the logged EOS signal == compute_signal's last token."""
    from transformers import TrainingArguments

    records, _ = load_interactions(FIXTURE)
    batch_records = records[:3]
    collator = SDPOCollator(tiny_tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             label_names=[], per_device_train_batch_size=3)
    opts = ObjectiveOptions(loss_mode="simple_signal", ignore_first_k=2)
    trainer = OfflineSDPOTrainer(model=tiny_model, args=args, train_dataset=records, data_collator=collator,
                                 processing_class=tiny_tokenizer, objective=opts)
    inputs = collator(batch_records)
    tiny_model.train()
    loss = trainer.compute_loss(tiny_model, inputs)

    pad = tiny_tokenizer.pad_token_id
    encoded = [collator.encode(r) for r in batch_records]
    batch_x = build_scoring_batch([e["x_ids"] for e in encoded], [e["completion_ids"] for e in encoded], pad)
    batch_xo = build_scoring_batch([e["xo_ids"] for e in encoded], [e["completion_ids"] for e in encoded], pad)
    expected, _ = sdpo_loss(tiny_model, batch_x, batch_xo, opts)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)

    signals = compute_signal(tiny_model, [e["x_ids"] for e in encoded], [e["xo_ids"] for e in encoded],
                             [e["completion_ids"] for e in encoded], pad)
    trainer.log({"loss": float(loss)})
    logged = trainer.state.log_history[-1]
    assert logged["eos_signal"] == pytest.approx(sum(s["signal"][-1] for s in signals) / 3, abs=1e-5)
    all_tokens = [v for s in signals for v in s["signal"]]
    assert logged["signal_mean"] == pytest.approx(sum(all_tokens) / len(all_tokens), abs=1e-5)
    assert logged["completion_tokens"] == pytest.approx(len(all_tokens) / 3)
    assert trainer.interactions_seen == 3
