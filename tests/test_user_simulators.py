"""Simulated users: rule-based replies on crafted texts, the placebo user, the shared prompt,
the local HF user on a tiny model, the factory and its errors."""
import importlib.util
import subprocess
import sys

import pytest

from auxiliary.feedback.personas import UnknownStyleError, get_persona
from auxiliary.feedback.style_checks import build_style_checks
from auxiliary.feedback.user_simulator import (APPROVALS, COMPLAINTS, RULE_USER_STYLES, LocalHFUserSimulator,
                                               NeutralUserSimulator, RuleBasedUserSimulator, UnsupportedStyleError,
                                               build_simulator_messages, clean_feedback)
from auxiliary.feedback.factory import make_user_simulator

PROMPT = "How do I make a simple tomato sauce?"
PLAIN = "Soften garlic in olive oil, add crushed tomatoes and salt, and simmer for twenty minutes"

# style -> (a reply the persona dislikes, the problems expected, a reply it accepts)
CASES = {
    "no_emojis": ("Simmer it slowly \U0001F345 and enjoy", ["emojis"], PLAIN),
    "writing_tics": ("Simmer it slowly \u2705", ["emojis"], PLAIN),
    "writing_tics_v2": ("## Sauce\nSimmer it slowly \U0001F4CC", ["emojis"], "## Sauce\n" + PLAIN),
    "no_lists": ("## Steps\n- soften garlic\n- add tomatoes", ["lists", "headers"], PLAIN),
    "more_lists": (PLAIN, ["no_list"], "Steps:\n1. soften garlic\n2. add tomatoes\n3. simmer"),
    "formatting": ("Steps:\n- soften garlic\n  - slowly\n- add tomatoes", ["lists"], PLAIN),
    "less_formatting": ("## Sauce\n**Garlic** first, then tomatoes", ["headers", "bold"], PLAIN),
    "more_formatting": (PLAIN, ["no_formatting"], "## Sauce\nUse **ripe** tomatoes"),
    "answer_directly_reduce_formatting": ("**Sauce**\n- garlic\n- tomatoes", ["lists", "bold"], PLAIN),
    "less_filler_praise_sycophancy": ("Great question! " + PLAIN + ". I hope this helps.",
                                      ["filler_opener", "praise", "filler_closer"], PLAIN),
    "sycophantic_and_praise": ("Great question! " + PLAIN + ". I hope this helps.",
                               ["filler_opener", "praise", "filler_closer"], PLAIN),
    "no_flattery": ("What a great idea to cook at home. " + PLAIN, ["praise"], PLAIN),
    "no_filler_followup": (PLAIN + ". Let me know if you want a spicy version.", ["filler_closer"], PLAIN),
    "exclamation": (PLAIN + "!", ["exclamation"], PLAIN),
    "no_exclamation": (PLAIN + "!", ["exclamation"], PLAIN),
    "more_exclamation": (PLAIN, ["flat"], PLAIN + "!"),
    "no_first_person": ("I usually " + PLAIN.lower(), ["first_person"], PLAIN),
    "no_punctuation": (PLAIN + "; then serve \u2014 hot", ["commas_dashes"], "Soften garlic in oil. Add tomatoes."),
    "no_punctuation_at_all": (PLAIN + ".", ["punctuation"], "soften garlic in oil add tomatoes and simmer"),
    "committing": ("Sauces usually need twenty minutes", ["hedging"], "Simmer it for twenty minutes."),
    "high_initiative": (PLAIN + ".", ["no_question"], PLAIN + ". Do you want it spicy?"),
    "concise": (" ".join(["word"] * 61), ["too_long"], " ".join(["word"] * 60)),
    "detailed": (PLAIN, ["too_short"], " ".join(["word"] * 150)),
    "short_sentences": (" ".join(["word"] * 21) + ". Short one.", ["long_sentences"],
                        " ".join(["word"] * 20) + ".\n" + " ".join(["word"] * 20)),
}


def test_every_rule_style_has_a_case_and_every_problem_a_phrase_bank():
    assert sorted(CASES) == sorted(RULE_USER_STYLES)
    produced = {p for style, (bad, _, _) in CASES.items() for p in build_style_checks()[style].problems(bad)}
    produced |= {"headers", "bold", "lists", "tables"}
    assert produced <= set(COMPLAINTS)
    texts = [t for bank in COMPLAINTS.values() for t in bank] + list(APPROVALS)
    assert not any("!" in t for t in texts)  # would contradict no_exclamation / reward what others dislike


@pytest.mark.parametrize("style", sorted(CASES))
def test_rule_user_complains_about_what_it_dislikes_and_approves_otherwise(style):
    bad, problems, good = CASES[style]
    user = RuleBasedUserSimulator(style, seed=0)
    assert user.problems(bad) == problems
    assert user.problems(good) == []
    complaint, approval = user.generate_feedback([PROMPT, PROMPT], [bad, good])
    used = [p for p in problems if any(sentence in complaint for sentence in COMPLAINTS[p])]
    assert len(used) == min(2, len(problems))  # one sentence per problem, at most two
    assert approval in APPROVALS


def test_rule_user_is_deterministic_given_the_seed_and_varied():
    replies = [f"Recipe number {i} \U0001F60A tastes great" for i in range(40)]
    prompts = [PROMPT] * len(replies)
    first = RuleBasedUserSimulator("no_emojis", seed=1).generate_feedback(prompts, replies)
    again = RuleBasedUserSimulator("no_emojis", seed=1).generate_feedback(prompts, replies)
    other = RuleBasedUserSimulator("no_emojis", seed=2).generate_feedback(prompts, replies)
    assert first == again
    assert first != other
    assert len(set(first)) >= 4  # varied wording, all of it about emojis
    assert set(first) <= set(COMPLAINTS["emojis"])
    # the same reply gets the same message whatever batch it comes in (resume replays it)
    single = RuleBasedUserSimulator("no_emojis", seed=1).generate_feedback([PROMPT], [replies[7]])
    assert single == [first[7]]
    # a seed passed to the call replaces the constructor's, for this call only
    user = RuleBasedUserSimulator("no_emojis", seed=2)
    assert user.generate_feedback(prompts, replies, seed=1) == first
    assert user.generate_feedback(prompts, replies) == other


def test_rule_user_thresholds_are_configurable():
    user = RuleBasedUserSimulator("concise", seed=0, concise_max_words=10)
    assert user.problems(" ".join(["w"] * 11)) == ["too_long"] and user.problems(" ".join(["w"] * 10)) == []


def test_style_errors():
    with pytest.raises(UnknownStyleError, match="known styles: .*no_emojis"):
        RuleBasedUserSimulator("no_emoji")
    with pytest.raises(UnsupportedStyleError) as info:
        RuleBasedUserSimulator("poetic")
    assert "'poetic'" in str(info.value) and all(s in str(info.value) for s in RULE_USER_STYLES)
    with pytest.raises(UnsupportedStyleError):
        make_user_simulator("rule", "concise_casual_beginner")
    with pytest.raises(ValueError, match="unknown user simulator kind 'gpt'.*rule, local, claude, vllm"):
        make_user_simulator("gpt", "no_emojis")
    # an unknown style fails before any model is loaded
    with pytest.raises(UnknownStyleError):
        make_user_simulator("local", "nope", model_name_or_path="/does/not/exist")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        RuleBasedUserSimulator("no_emojis").generate_feedback([PROMPT, PROMPT], [PLAIN])


def test_neutral_user_is_content_free():
    user = NeutralUserSimulator()
    assert user.generate_feedback([PROMPT] * 3, ["\U0001F600!!", PLAIN, ""]) == ["OK, thanks."] * 3
    texts = ("OK.", "Thanks.", "Got it.")
    custom = NeutralUserSimulator(texts=texts, seed=5)
    out = custom.generate_feedback([f"q{i}" for i in range(30)], [PLAIN] * 30)
    assert set(out) == set(texts) and out == NeutralUserSimulator(texts=texts, seed=5).generate_feedback(
        [f"q{i}" for i in range(30)], [PLAIN] * 30)
    assert make_user_simulator("neutral", "no_emojis", texts=["Fine."]).generate_feedback(["q"], ["r"]) == ["Fine."]
    assert NeutralUserSimulator(texts=texts, seed=9).generate_feedback([f"q{i}" for i in range(30)], [PLAIN] * 30,
                                                                        seed=5) == out
    assert custom.problems("\U0001F600!!") is None and custom.api_usage() is None  # no rules, no API
    with pytest.raises(ValueError, match="non-empty texts"):
        NeutralUserSimulator(texts=["  "])


def test_simulator_prompt_has_persona_request_and_reply():
    messages = build_simulator_messages("no_emojis", "Plan my trip", "Here is a plan \U0001F30D")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith(get_persona("no_emojis"))
    assert "Never answer or redo the request" in messages[0]["content"]
    assert "Plan my trip" in messages[1]["content"] and "Here is a plan \U0001F30D" in messages[1]["content"]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "plan my trip"}]
    text = build_simulator_messages("concise", conversation, "ok")[1]["content"]
    assert "User: hi" in text and "Assistant: hello" in text and "User: plan my trip" in text
    with pytest.raises(UnknownStyleError):
        build_simulator_messages("???", "q", "r")


@pytest.mark.parametrize("raw, clean", [
    ('"Too long, please."', "Too long, please."),
    ("User: Please shorten it.", "Please shorten it."),
    ("<think>\nthe user wants...\n</think>\n\n**Next message:** Fewer emojis.", "Fewer emojis."),
    ("  \u201cNo lists.\u201d ", "No lists."),
    ("<think>unfinished", ""),
])
def test_clean_feedback(raw, clean):
    assert clean_feedback(raw) == clean


def test_local_hf_user_on_a_tiny_model(tiny_model, tiny_tokenizer, tiny_model_dir):
    sim = LocalHFUserSimulator((tiny_model, tiny_tokenizer), "no_emojis", max_new_tokens=8, batch_size=2, seed=0)
    out = sim.generate_feedback([PROMPT, "Plan my trip", "Hi"], [PLAIN, "A plan", "Hello \U0001F600"])
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    again = LocalHFUserSimulator((tiny_model, tiny_tokenizer), "no_emojis", max_new_tokens=8, batch_size=2, seed=0)
    assert again.generate_feedback([PROMPT, "Plan my trip", "Hi"], [PLAIN, "A plan", "Hello \U0001F600"]) == out
    other_default = LocalHFUserSimulator((tiny_model, tiny_tokenizer), "no_emojis", max_new_tokens=8, batch_size=2,
                                         seed=41)
    assert other_default.generate_feedback([PROMPT, "Plan my trip", "Hi"], [PLAIN, "A plan", "Hello \U0001F600"],
                                           seed=0) == out  # the call's seed decides the sampling
    from_path = make_user_simulator("local", "concise", model_name_or_path=tiny_model_dir, max_new_tokens=4,
                                    temperature=0.0)
    assert len(from_path.generate_feedback([PROMPT] * 2, [PLAIN] * 2)) == 2


def test_vllm_modules_do_not_import_vllm():
    code = (
        "import sys, auxiliary.feedback.vllm_user_simulator, auxiliary.feedback.vllm_style_judge, "
        "auxiliary.feedback.user_simulator, "
            "auxiliary.feedback.style_judge, auxiliary.feedback.claude_user_simulator, "
            "auxiliary.feedback.claude_style_judge; "
            "print('vllm' in sys.modules, 'anthropic' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_user_without_vllm_fails_clearly():
    with pytest.raises(ImportError, match="requirements-vllm.txt"):
        make_user_simulator("vllm", "no_emojis", model_name_or_path="tiny-random")


def test_empty_follow_ups_are_asked_again_then_fail_loudly():
    from auxiliary.feedback.user_simulator import EmptyFeedbackError, retry_empty_feedback

    calls = []

    def regenerate(indices, attempt):
        calls.append((list(indices), attempt))
        return ["fixed" if i == 0 else "" for i in indices]

    assert retry_empty_feedback(["", "ok"], regenerate, 2, "test user", "empty {items}") == ["fixed", "ok"]
    assert calls == [([0], 1)]
    calls.clear()
    with pytest.raises(EmptyFeedbackError, match=r"empty \[2\]"):
        retry_empty_feedback(["", "ok", ""], regenerate, 2, "test user", "empty {items}")
    assert calls == [([0, 2], 1), ([2], 2)]
    with pytest.raises(EmptyFeedbackError):
        retry_empty_feedback([""], None, 0, "test user", "empty {items}")
