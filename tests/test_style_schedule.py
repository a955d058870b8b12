"""Style schedules (preference flips, sequential preferences) and the multi-user draw."""
from collections import Counter

import pytest

from auxiliary.feedback.schedule import MultiUserDraw, StyleSchedule


def test_a_flip_after_250_interactions():
    schedule = StyleSchedule.parse("concise:250, detailed:250")
    assert schedule.total == 500 and schedule.styles == ["concise", "detailed"] and schedule.boundaries == [250]
    assert [schedule.style_at(s) for s in (1, 250, 251, 500)] == ["concise", "concise", "detailed", "detailed"]
    assert [schedule.phase_at(s) for s in (1, 250, 251, 500, 600)] == [0, 0, 1, 1, 1]
    assert schedule.describe() == "concise for steps 1-250, detailed for steps 251-500"


def test_three_sequential_preferences_and_a_return_to_an_earlier_style():
    schedule = StyleSchedule.parse("no_emojis:500,concise:500,no_lists:500")
    assert schedule.boundaries == [500, 1000] and schedule.total == 1500
    again = StyleSchedule.parse("concise:3,detailed:2,concise:1")
    assert again.styles == ["concise", "detailed"] and [again.style_at(s) for s in range(1, 7)] == [
        "concise", "concise", "concise", "detailed", "detailed", "concise"]


@pytest.mark.parametrize("text, message", [
    ("concise", "is not STYLE:N"),
    ("concise:ten", "is not STYLE:N"),
    (":5", "is not STYLE:N"),
    ("concise:0", "N must be >= 1"),
    ("concise:-3", "N must be >= 1"),
    ("concise:5,no_emojiz:5", "unknown style 'no_emojiz'"),
    ("concise:5,,detailed:5", "is not STYLE:N"),
])
def test_bad_schedules_fail_in_one_line_naming_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        StyleSchedule.parse(text)


def test_the_multi_user_draw_is_seeded_and_uses_every_user():
    draw = MultiUserDraw(["concise", "no_emojis", "no_lists"], seed=7)
    picks = [draw.style_at(s) for s in range(1, 301)]
    assert picks == [MultiUserDraw(["concise", "no_emojis", "no_lists"], seed=7).style_at(s) for s in range(1, 301)]
    assert picks != [MultiUserDraw(["concise", "no_emojis", "no_lists"], seed=8).style_at(s) for s in range(1, 301)]
    assert all(60 < count < 140 for count in Counter(picks).values())  # ~100 each
    with pytest.raises(ValueError, match="at least two styles"):
        MultiUserDraw(["concise"], seed=0)
