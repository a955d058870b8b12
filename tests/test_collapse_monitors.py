"""Collapse monitors against independent computations."""
import math

import pytest
import torch

from auxiliary.evals.collapse import collapse_warnings, distinct_n, policy_monitors, text_monitors
from sdpo_objective import render_context_ids


def test_text_monitors_by_hand():
    texts = ["a b a b", "Just do it now. Just do it now. Just do it now.", "c d e"]
    # bigrams: (a b)(b a)(a b) | 11 bigrams, 5 distinct... computed below independently
    words = [t.lower().split() for t in texts]
    grams = [tuple(w[i:i + 2]) for w in words for i in range(len(w) - 1)]
    assert distinct_n(texts) == pytest.approx(len(set(grams)) / len(grams))
    monitors = text_monitors(texts)
    assert monitors["degenerate_replies"] == 1 and monitors["degenerate_share"] == pytest.approx(1 / 3)
    assert monitors["mean_words"] == pytest.approx((4 + 12 + 3) / 3)
    assert distinct_n([]) == 1.0 and text_monitors([])["degenerate_share"] == 0.0


@pytest.mark.parametrize("batch_size", [1, 2])  # one reply per forward, or both left-padded in one
def test_policy_monitors_equal_a_direct_computation(tiny_model, tiny_tokenizer, batch_size):
    conversations = [[{"role": "user", "content": "hello there"}],
                     [{"role": "user", "content": "count to three, then keep counting a while"}]]
    replies = ["hello friend", "one two three"]
    got = policy_monitors(tiny_model, tiny_tokenizer, conversations, replies, batch_size=batch_size)
    entropy, logprob, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for messages, text in zip(conversations, replies):
            reply = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = render_context_ids(tiny_tokenizer, messages) + reply
            logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            for offset, token in enumerate(reply):
                row = logp[len(ids) - len(reply) - 1 + offset]
                entropy += float(-(row.exp() * row).sum())
                logprob += float(row[token])
                tokens += 1
    assert got["entropy"] == pytest.approx(entropy / tokens, rel=1e-4)
    assert got["logprob"] == pytest.approx(logprob / tokens, rel=1e-4)
    assert 0 < got["entropy"] <= math.log(tiny_model.config.vocab_size) + 1e-4


def test_warnings_fire_past_their_thresholds_only():
    reference = {"distinct_2": 0.9, "entropy": 2.0, "logprob": -2.0, "degenerate_share": 0.0}
    healthy = {"distinct_2": 0.8, "entropy": 1.5, "logprob": -2.5, "degenerate_share": 0.05}
    assert collapse_warnings(healthy, reference, baseline_share=0.0) == []
    collapsed = {"distinct_2": 0.3, "entropy": 0.4, "logprob": -4.0, "degenerate_share": 0.3}
    warnings = collapse_warnings(collapsed, reference, baseline_share=0.0)
    assert len(warnings) == 4 and "degenerate replies 30%" in warnings[0] and "-2.00 nats" in warnings[3]


def test_eval_and_reply_monitors_combine_the_pieces(tiny_model, tiny_tokenizer):
    from auxiliary.evals.collapse import eval_monitors, relative_to_start, reply_monitors

    conversations = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "count to three"}]]
    own = ["Say it now. Say it now. Say it now. Say it now.", "one two three"]
    baseline = ["hello friend", "one, two, three"]
    record = eval_monitors(tiny_model, tiny_tokenizer, conversations, own, baseline)
    # entropy on the arm's own replies, log-probability on the baseline's: two different reply sets
    assert record["entropy"] == pytest.approx(
        policy_monitors(tiny_model, tiny_tokenizer, conversations, own)["entropy"])
    assert record["logprob"] == pytest.approx(
        policy_monitors(tiny_model, tiny_tokenizer, conversations, baseline)["logprob"])
    assert record["degenerate_replies"] == 1 and record["distinct_2"] == pytest.approx(distinct_n(own))
    start = {"entropy": 2.0, "logprob": -3.0}
    assert relative_to_start({"entropy": 1.0, "logprob": -3.5}, start) == pytest.approx(
        {"entropy_ratio": 0.5, "logprob_drift": -0.5})
    assert relative_to_start({"entropy": 1.0}, None) == {}
    row = reply_monitors(tiny_model, tiny_tokenizer, conversations[0], own[0])
    assert row["degenerate"] is True and row["distinct_2"] == pytest.approx(distinct_n([own[0]]))
    assert row["entropy"] == pytest.approx(
        policy_monitors(tiny_model, tiny_tokenizer, conversations[:1], own[:1])["entropy"])
