"""Personas: the named styles of the spec exist, are ours and distinct; unknown names fail helpfully."""
from itertools import product

import pytest

from auxiliary.feedback.personas import (PAPER_STYLES, PERSONAS, PersonaStyle, UnknownStyleError, get_persona,
                                        list_styles)

# The single-preference names of the paper repository (lasgroup/user_interactions): with the 8
# combinations, its 31 styles.
NAMED_PROFILES = [
    "no_emojis", "less_filler_praise_sycophancy", "answer_directly_reduce_formatting", "poetic", "no_punctuation",
    "no_first_person", "clarification_first", "single_answer", "answer_first", "no_filler_followup",
    "high_initiative", "committing", "no_lists", "more_lists", "more_formatting", "less_formatting", "opinionated",
    "exclamation", "no_sycophantic", "writing_tics", "writing_tics_v2", "formatting", "sycophantic_and_praise",
]
OUR_EXTRAS = ["concise", "detailed", "no_exclamation", "more_exclamation", "no_flattery", "no_punctuation_at_all",
              "anticipate_next_step", "short_sentences"]


def test_all_named_styles_and_the_eight_combinations_exist():
    combos = [f"{a}_{b}_{c}" for a, b, c in product(("concise", "detailed"), ("casual", "professional"),
                                                     ("beginner", "expert"))]
    assert len(combos) == 8
    missing = [s for s in combos + NAMED_PROFILES + OUR_EXTRAS if s not in PERSONAS]
    assert missing == []
    assert sorted(PAPER_STYLES) == sorted(combos + NAMED_PROFILES) and len(PAPER_STYLES) == 31
    assert sorted(PERSONAS) == sorted(combos + NAMED_PROFILES + OUR_EXTRAS)
    assert list_styles() == sorted(PERSONAS)


def test_descriptions_are_distinct_and_substantial():
    texts = list(PERSONAS.values())
    assert len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 20 for t in texts), [s for s, t in PERSONAS.items() if len(t.split()) < 20]
    # the combinations really combine their three parts
    text = get_persona("detailed_professional_expert")
    assert "thorough" in text and "professional" in text and "terminology" in text
    assert "short answers" in get_persona("concise_casual_beginner") and "jargon" in get_persona(
        "concise_casual_beginner")


def test_unknown_style_lists_the_known_ones():
    with pytest.raises(UnknownStyleError) as info:
        get_persona("no_emoji")  # typo of no_emojis
    message = str(info.value)
    assert "'no_emoji'" in message and "no_emojis" in message and "concise_casual_beginner" in message
    assert isinstance(info.value, ValueError)
    assert info.value.known == list_styles()
    with pytest.raises(UnknownStyleError):
        get_persona(None)


@pytest.mark.parametrize("style, words", [
    # the six names whose meaning the paper repository fixes differently from a naive reading
    ("exclamation", ["exclamation marks", "without them", "clarifying question"]),
    ("no_sycophantic", ["question assumptions", "disagree"]),
    ("high_initiative", ["follow-up questions"]),
    ("answer_directly_reduce_formatting", ["concise", "lists", "bold", "headers"]),
    ("no_punctuation", ["commas", "dashes", "semicolons"]),
    ("concise_professional_expert", ["extremely short", "semicolons", "em-dashes"]),
    ("concise_casual_expert", ["extremely short", "slang"]),
    ("concise_professional_beginner", ["extremely short", "extremely formal"]),
])
def test_paper_styles_carry_the_paper_repositorys_meaning(style, words):
    text = get_persona(style)
    assert all(w in text for w in words), (style, [w for w in words if w not in text])


def test_no_punctuation_keeps_periods_and_more_exclamation_is_ours():
    assert "periods" not in get_persona("no_punctuation")
    assert "exclamation marks" in get_persona("more_exclamation") and "upbeat" in get_persona("more_exclamation")


def test_every_user_and_judge_checks_its_style_in_one_place():
    """The base classes' `style` (personas.PersonaStyle) is the components' one check: an unknown style
    fails however a component is built or re-pointed, before it loads anything."""
    from auxiliary.feedback.style_judge import LocalHFJudge, PairwiseJudge, RuleBasedJudge
    from auxiliary.feedback.user_simulator import LocalHFUserSimulator, NeutralUserSimulator, UserSimulator

    judge = RuleBasedJudge("no_emojis")
    with pytest.raises(UnknownStyleError, match="known styles: .*no_emojis"):
        judge.style = "no_emoji"
    assert judge.style == "no_emojis" and NeutralUserSimulator().style is None
    for component in (LocalHFJudge, LocalHFUserSimulator):  # a model path that does not exist: never loaded
        with pytest.raises(UnknownStyleError):
            component("/does/not/exist", "bogus")
    assert isinstance(UserSimulator.__dict__["style"], PersonaStyle)
    assert isinstance(PairwiseJudge.__dict__["style"], PersonaStyle)
