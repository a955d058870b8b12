"""Style judges: verdict parsing, the both-order protocol with scripted judges, the rule judge,
and the local HF judge (generate and label-log-prob modes) on a tiny model."""
import importlib.util
import math

import pytest
import torch

from auxiliary.feedback.personas import UnknownStyleError, get_persona
from auxiliary.feedback.style_judge import (RULE_JUDGE_STYLES, LocalHFJudge, PairwiseJudge, RuleBasedJudge,
                                            _label_continuations, build_judge_messages, margin_verdict,
                                            combine_verdicts, label_logprobs, parse_verdict)
from auxiliary.feedback.factory import make_judge
from auxiliary.feedback.user_simulator import UnsupportedStyleError


@pytest.mark.parametrize("text, verdict", [
    ("Response A is plain.\nJudgement: A", "A"),
    ("**Judgement:** **B**", "B"),
    ("**Judgement**: A", "A"),
    ("JUDGEMENT: c", "C"),
    ("judgment: b.", "B"),
    ('Judgement: "B"', "B"),
    ("Judgement: [[A]]", "A"),
    ('{"reason": "shorter", "judgement": "a"}', "A"),
    ("Judgement: Response B", "B"),
    ("Judgement: a tie", "C"),              # "a" is an article here, not the letter A
    ("Judgement: Tie.", "C"),
    ("Judgement: Both are equally plain", "C"),
    ("Judgement: a is better", "A"),
    ("Judgement:\n\n**B**", "B"),           # verdict on the next line
    ("Judgement: A\nOn reflection...\nJudgement: B", "B"),  # the final line wins
    ("Response A uses a list.\n\nVerdict: B", "B"),
    ("Final answer: (A)", "A"),
    ("B", "B"),
    ("Reasoning first.\n\n**C**", "C"),
    ("My judgement is that neither\nJudgement: A", "A"),
    ("Bad answers both. Absolutely awful.", None),  # no stray letter inside a word
    ("Both responses are Acceptable", None),
    ("The better one is A", None),           # no label, no lone letter: not guessed
    ("Judgement: X", None),
    ("", None),
    (None, None),
])
def test_parse_verdict_on_messy_text(text, verdict):
    assert parse_verdict(text) == verdict


def test_user_framing_role_plays_the_persona_as_the_paper_does():
    system, user = build_judge_messages("no_emojis", "Plan my trip", "first reply", "second reply")
    assert system["role"] == "system" and system["content"].startswith(get_persona("no_emojis"))
    assert "You are this user" in system["content"] and "style only" in system["content"]
    assert "not judge correctness" in system["content"]
    assert get_persona("no_emojis") not in user["content"] and "Plan my trip" in user["content"]
    assert user["content"].index("first reply") < user["content"].index("second reply")
    assert "your own style preferences" in user["content"] and "C means a tie" in user["content"]
    assert user["content"].rstrip().endswith('"Judgement: C".')
    assert build_judge_messages("no_emojis", "q", "a", "b") == build_judge_messages("no_emojis", "q", "a", "b",
                                                                                     framing="user")
    with pytest.raises(ValueError, match="choose one of user, neutral"):
        build_judge_messages("no_emojis", "q", "a", "b", framing="referee")


def test_neutral_framing_prompt_holds_persona_request_and_both_responses_in_order():
    messages = build_judge_messages("no_emojis", "Plan my trip", "first reply", "second reply", framing="neutral")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "You are an impartial, careful judge of writing style."
    user = messages[1]["content"]
    assert get_persona("no_emojis") in user and "Plan my trip" in user
    assert user.index("first reply") < user.index("second reply")
    assert "Judge style only" in user and "C means a tie" in user
    assert user.rstrip().endswith('"Judgement: C".')
    terse = build_judge_messages("no_emojis", "q", "a", "b", explain=False, framing="neutral")[1]["content"]
    assert "one line only" in terse and "Explain" not in terse
    with pytest.raises(UnknownStyleError):
        build_judge_messages("bogus", "q", "a", "b")


class ScriptedJudge(PairwiseJudge):
    """judge_once answers from a function of (first, second) and records its calls."""

    def __init__(self, decide):
        super().__init__()
        self.decide = decide
        self.calls = []

    def judge_once(self, prompts, first, second):
        self.calls.append((list(prompts), list(first), list(second)))
        return [self.decide(x, y) for x, y in zip(first, second)]


def test_both_orders_are_judged_in_one_batch_and_agreement_counts():
    judge = ScriptedJudge(lambda x, y: "A" if x == "good" else "B" if y == "good" else "C")
    comparison = judge.compare_detailed(["p1", "p2", "p3"], ["good", "bad", "same"], ["bad", "good", "same"])
    assert comparison.decisions == ["A", "B", "C"]
    (prompts, first, second), = judge.calls
    assert prompts == ["p1", "p2", "p3"] * 2
    assert first == ["good", "bad", "same", "bad", "good", "same"]   # forward, then swapped
    assert second == ["bad", "good", "same", "good", "bad", "same"]
    assert comparison.verdicts == [("A", "B"), ("B", "A"), ("C", "C")] and comparison.unparseable == 0
    assert judge.stats["pairs"] == 3 and judge.stats["agreed_decisive"] == 2 and judge.stats["disagreements"] == 0
    assert judge.compare(["p1"], ["good"], ["bad"]) == ["A"]  # compare: the decisions alone


def test_position_bias_disagreement_and_unparseable_become_ties():
    always_first = ScriptedJudge(lambda x, y: "A")
    assert always_first.compare(["p"] * 2, ["x", "y"], ["y", "x"]) == ["C", "C"]
    assert always_first.stats["disagreements"] == 2
    half_tie = ScriptedJudge(lambda x, y: "A" if x == "good" else "C")  # decisive in one order only
    assert half_tie.compare(["p"], ["good"], ["bad"]) == ["C"]
    broken = ScriptedJudge(lambda x, y: None if x == "bad" else "A")
    comparison = broken.compare_detailed(["p"], ["good"], ["bad"])
    assert comparison.decisions == ["C"] and comparison.verdicts == [("A", None)] and comparison.unparseable == 1
    assert broken.stats["unparseable"] == 1
    assert combine_verdicts("B", "A") == "B" and combine_verdicts("A", "A") == "C"
    assert combine_verdicts(None, "B") == "C"
    with pytest.raises(ValueError, match="2 prompts, 1 completions_a"):
        always_first.compare(["p", "q"], ["x"], ["y"])
    with pytest.raises(RuntimeError, match="invalid verdicts"):
        ScriptedJudge(lambda x, y: "D").compare(["p"], ["x"], ["y"])
    assert always_first.compare([], [], []) == []


def test_rule_judge_scores_the_checkable_property():
    emojis = RuleBasedJudge("no_emojis")
    assert emojis.compare(["q"] * 3, ["plain", "one \U0001F600", "one \U0001F600 two \U0001F389"],
                          ["x \U0001F600", "plain", "three \U0001F600"]) == ["A", "B", "B"]
    concise = RuleBasedJudge("concise")
    assert concise.compare(["q"] * 2, ["short reply", "one two three"], ["a much longer reply here", "four five six"]) \
        == ["A", "C"]  # equal word counts tie
    lists = RuleBasedJudge("more_lists")
    assert lists.compare(["q"], ["- a\n- b\n- c"], ["- a\n- b"]) == ["A"]
    with pytest.raises(UnsupportedStyleError) as info:
        RuleBasedJudge("poetic")
    assert all(style in str(info.value) for style in RULE_JUDGE_STYLES)
    with pytest.raises(UnknownStyleError):
        make_judge("rule", "nonexistent")
    with pytest.raises(ValueError, match="unknown judge kind 'gpt4'.*rule, local, claude, vllm"):
        make_judge("gpt4", "no_emojis")


def test_local_judge_generate_mode_on_a_tiny_model(tiny_model, tiny_tokenizer):
    judge = make_judge("local", "no_emojis", model_name_or_path=(tiny_model, tiny_tokenizer),
                       mode="generate", max_new_tokens=6, batch_size=4)
    comparison = judge.compare_detailed(["q1", "q2"], ["plain", "x \U0001F600"], ["y \U0001F600", "plain"])
    decisions = comparison.decisions
    assert len(decisions) == 2 and set(decisions) <= {"A", "B", "C"}
    assert len(judge.last_outputs) == 4 and len(comparison.verdicts) == 2
    assert comparison.verdicts == [(parse_verdict(judge.last_outputs[0]), parse_verdict(judge.last_outputs[2])),
                                   (parse_verdict(judge.last_outputs[1]), parse_verdict(judge.last_outputs[3]))]


def test_label_logprobs_match_an_unpadded_forward(tiny_model, tiny_tokenizer):
    from sdpo_objective import render_context_ids

    conversations = [build_judge_messages("concise", "question", "short", "b", explain=False),
                     build_judge_messages("concise", "a longer question " * 5, "long " * 9, "b", explain=False)]
    batched = label_logprobs(tiny_model, tiny_tokenizer, conversations, batch_size=2)  # one left-padded batch
    prefix, continuations = _label_continuations(tiny_tokenizer)
    lengths = [len(render_context_ids(tiny_tokenizer, c)) for c in conversations]
    assert lengths[0] + 10 < lengths[1]  # the short one really is padded
    for conversation, scores in zip(conversations, batched):
        context = render_context_ids(tiny_tokenizer, conversation) + prefix
        assert set(scores) == {"A", "B", "C"}
        for label, tokens in continuations.items():
            ids = torch.tensor([context + tokens])
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(input_ids=ids).logits.float()[0], dim=-1)
            expected = sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(tokens))
            assert scores[label] == pytest.approx(expected, abs=1e-4)
    judge = LocalHFJudge((tiny_model, tiny_tokenizer), "concise", mode="logprob", batch_size=2)
    comparison = judge.compare_detailed(["q1", "q2"], ["short", "a b c"], ["a longer one", "d e f"])
    decisions = comparison.decisions
    assert len(decisions) == 2 and set(decisions) <= {"A", "B", "C"}
    assert len(judge.last_label_logprobs) == 4
    assert all(math.isfinite(v) and v < 0 for scores in judge.last_label_logprobs for v in scores.values())
    for (forward, backward), scores in zip(comparison.verdicts, judge.last_label_logprobs[:2]):
        assert forward == margin_verdict(scores, 0.05)  # the default --tie_margin
    no_margin = LocalHFJudge((tiny_model, tiny_tokenizer), "concise", mode="logprob", batch_size=2, tie_margin=0.0)
    for (forward, _), scores in zip(no_margin.compare_detailed(["q1", "q2"], ["short", "a b c"],
                                                               ["a longer one", "d e f"]).verdicts,
                                    no_margin.last_label_logprobs[:2]):
        assert forward == max(scores, key=scores.get)
    with pytest.raises(ValueError, match="'generate' or 'logprob'"):
        LocalHFJudge((tiny_model, tiny_tokenizer), "concise", mode="sample")


def test_tie_margin_by_hand():
    assert margin_verdict({"A": -1.00, "B": -1.04, "C": -3.0}, 0.05) == "C"  # 0.04 nats: not enough
    assert margin_verdict({"A": -1.00, "B": -1.06, "C": -3.0}, 0.05) == "A"
    assert margin_verdict({"A": -2.0, "B": -0.5, "C": -0.9}, 0.05) == "B"
    assert margin_verdict({"A": -2.0, "B": -0.5, "C": -0.52}, 0.05) == "C"  # C wins narrowly: a tie anyway
    with pytest.raises(ValueError, match="tie_margin must be >= 0"):
        LocalHFJudge(("m", "t"), "concise", tie_margin=-1)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_judge_without_vllm_fails_clearly():
    with pytest.raises(ImportError, match="requirements-vllm.txt"):
        make_judge("vllm", "no_emojis", model_name_or_path="tiny-random")
