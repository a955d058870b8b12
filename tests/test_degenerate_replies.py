"""Rule judges never reward broken text: a stutter, an answer to the follow-up or a reply cut mid-sentence
loses to a sound reply (or ties with another broken one), whatever the style prefers."""
import pytest

from auxiliary.feedback.style_checks import answers_the_followup, degeneracy, looks_unfinished, repeated_phrase
from auxiliary.feedback.style_judge import RuleBasedJudge

SOUND = "Simmer the tomatoes with garlic and olive oil for twenty minutes, then season with salt."
STUTTER = "Just make it now. Just make it now. Just make it now."
APOLOGY = "Sorry for the misunderstanding. Here is a shorter one."
CUT = "Simmer the tomatoes with garlic and olive oil for twenty minutes, then season with"


def test_detectors_on_examples():
    assert repeated_phrase(STUTTER) == "just make it now"
    assert repeated_phrase(SOUND) is None and repeated_phrase("a b c d a b c d") is None  # twice is not a loop
    assert answers_the_followup(APOLOGY) and answers_the_followup("You're right, it was too long. Here:")
    assert not answers_the_followup(SOUND) and not answers_the_followup("Tomatoes are right for this. Sorry.")
    assert looks_unfinished(CUT) and not looks_unfinished(SOUND)
    assert not looks_unfinished("Steps:\n- garlic\n- tomatoes") and not looks_unfinished("```\ncode\n```")
    assert degeneracy(STUTTER) == ["repeated_phrase"] and degeneracy(APOLOGY) == ["answers_followup"]
    assert degeneracy("  ") == ["empty"] and degeneracy(SOUND) == []


@pytest.mark.parametrize("broken", [STUTTER, APOLOGY, CUT])
def test_a_broken_short_reply_loses_to_a_longer_sound_one_for_the_concise_judge(broken):
    judge = RuleBasedJudge("concise")
    assert len(broken.split()) < len(SOUND.split())  # on length alone the broken reply would win
    assert judge.compare(["q"], [broken], [SOUND]) == ["B"]
    assert judge.compare(["q"], [SOUND], [broken]) == ["A"]


def test_two_broken_replies_tie_and_two_sound_ones_are_judged_on_style():
    judge = RuleBasedJudge("concise")
    assert judge.compare(["q"], [STUTTER], [APOLOGY]) == ["C"]
    assert judge.compare(["q"], ["Simmer it for twenty minutes."], [SOUND]) == ["A"]


def test_a_stutter_without_emojis_still_loses_for_the_no_emojis_judge():
    judge = RuleBasedJudge("no_emojis")
    assert judge.compare(["q"], [STUTTER], ["Simmer it slowly \U0001F345."]) == ["B"]
