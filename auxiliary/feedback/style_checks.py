"""Program-checkable style properties, shared by the rule-based user and the rule-based judge.

For each checkable style a `StyleCheck` gives
    problems(text) -> list[str]   what a user with that persona would complain about
                                  (keys such as "emojis", "lists", "too_long"; empty = satisfied)
    score(text) -> float          how well the text fits the style, higher is better; the rule
                                  judge prefers the higher score and calls equal scores a tie.

Detectors (all ignore fenced and inline code, except the word count):
- emojis: pictographs, dingbats, flags, plus ASCII emoticons such as :) ;-) :D
- markdown: list items (-, *, +, bullets, "1." / "1)"), ATX headers (#), bold (**x** / __x__), table rows
- length: words = whitespace-separated tokens containing a letter or digit
- filler: an opener in the first words ("Sure!", "Great question", "I'd be happy to"), a closer in
  the last sentences ("I hope this helps", "Let me know if...", "Feel free to...", "Good luck"),
  and praise of the user anywhere ("great question", "you're absolutely right")
- exclamation marks, first-person singular pronouns (I, I'm, me, my, mine, myself), punctuation
  (every Unicode punctuation character, or only commas, dashes and semicolons), softening adverbs
  (generally, typically, often, usually), questions asked, nested list items.

The checks follow the meanings of the paper repository's styles (auxiliary/feedback/personas.py).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

DEFAULT_CONCISE_MAX_WORDS = 60
DEFAULT_DETAILED_MIN_WORDS = 150

_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_EMOJI = re.compile(
    "[\U0001F1E6-\U0001F1FF"   # regional indicators (flags)
    "\U0001F300-\U0001F3FA"    # pictographs (the skin-tone modifiers 1F3FB-1F3FF are left out)
    "\U0001F400-\U0001FAFF"    # pictographs, emoticons, transport, supplemental symbols
    "\u2600-\u27BF"            # miscellaneous symbols and dingbats
    "\u2B50\u2B55\u2B1B\u2B1C\u2934\u2935\u3030\u303D\u3297\u3299]"
)
_EMOTICON = re.compile(r"(?:(?<=\s)|^)[:;=]-?[)(DPp](?=[\s.,!?]|$)", re.M)
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+\u2022\u2023\u25e6\u25aa]|\d{1,3}[.)])[ \t]+\S", re.M)
_HEADER = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+\S", re.M)
_BOLD = re.compile(r"\*\*[^*\n]+?\*\*|(?<!\w)__[^_\n]+?__(?!\w)")
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.M)
_FIRST_PERSON = re.compile(r"(?<![\w'\u2019])(?:I(?:['\u2019](?:m|ve|d|ll))?|[Mm]e|[Mm]y|[Mm]ine|[Mm]yself|ME|MY)"
                           r"(?![\w'\u2019])")
_OPENER = re.compile(
    r"^(?:sure|certainly|of course|absolutely|great question|good question|excellent question|"
    r"what a (?:great|good|wonderful|fantastic|lovely|fun|brilliant)|i'?d (?:be )?(?:happy|glad|love) to|"
    r"i would (?:be )?(?:happy|glad|love) to|i'?m (?:happy|glad) to|happy to help|glad you asked|"
    r"thanks? (?:you )?for (?:asking|your question|reaching out)|great idea|that'?s (?:a )?(?:great|excellent|"
    r"wonderful|fantastic|good|lovely|brilliant)|oh|ah|hello|hi|hey|okay|ok)(?=\W|$)",
    re.I)
_CLOSER = re.compile(
    r"(?:hope (?:this|that|it) helps|let me know|feel free|don'?t hesitate|do not hesitate|"
    r"any (?:other|more|further) questions|if you (?:have|need) (?:any )?(?:more|further|other|anything)|"
    r"happy to help|would you like (?:me )?to|do you want me to|want me to|shall i\b|good luck|best of luck|"
    r"happy (?:cooking|baking|travels|traveling|travelling|writing|coding|learning|gardening|reading)|"
    r"have fun|have a (?:great|good|wonderful|nice)|enjoy\b)",
    re.I)
_PRAISE = re.compile(
    r"(?:(?:great|good|excellent|fantastic|wonderful|brilliant|smart|insightful|thoughtful) "
    r"(?:question|idea|choice|thinking|point)|you'?re (?:absolutely |so |totally )?right|"
    r"you are (?:absolutely |so |totally )?right|what a (?:great|wonderful|fantastic|lovely|brilliant)|"
    r"love (?:this|that|your) (?:question|idea)|i love that you)",
    re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def strip_code(text: str) -> str:
    return _INLINE_CODE.sub(" ", _CODE_BLOCK.sub(" ", text))


def count_words(text: str) -> int:
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def count_emojis(text: str) -> int:
    plain = strip_code(text)
    return len(_EMOJI.findall(plain)) + len(_EMOTICON.findall(plain))


def count_list_items(text: str) -> int:
    return len(_LIST_ITEM.findall(strip_code(text)))


def count_headers(text: str) -> int:
    return len(_HEADER.findall(strip_code(text)))


def count_bold(text: str) -> int:
    return len(_BOLD.findall(strip_code(text)))


def count_table_rows(text: str) -> int:
    return len(_TABLE_ROW.findall(strip_code(text)))


def count_exclamations(text: str) -> int:
    return strip_code(text).count("!")


def count_first_person(text: str) -> int:
    return len(_FIRST_PERSON.findall(strip_code(text)))


_DASH = re.compile(r"[\u2013\u2014]|(?<=\s)-{1,2}(?=\s)")  # en/em dashes, and hyphens used as dashes
_HEDGE = re.compile(r"\b(?:generally|typically|often|usually|in most cases|it depends)\b", re.I)
_NESTED_ITEM = re.compile(r"^(?:[ ]{2,}|\t)+(?:[-*+\u2022\u2023\u25e6\u25aa]|\d{1,3}[.)])[ \t]+\S", re.M)
_QUESTION = re.compile(r"\?(?=\s|$)")


def count_commas_dashes_semicolons(text: str) -> int:
    """The marks the paper repository's no_punctuation user dislikes (periods are fine)."""
    plain = strip_code(text)
    return plain.count(",") + plain.count(";") + len(_DASH.findall(plain))


def count_nested_list_items(text: str) -> int:
    return len(_NESTED_ITEM.findall(strip_code(text)))


SHORT_SENTENCE_MAX_WORDS = 20


def count_long_sentences(text: str, max_words: int = SHORT_SENTENCE_MAX_WORDS) -> int:
    """Sentences (split after . ! ? and at line breaks) of more than `max_words` words; code is ignored."""
    pieces = _SENTENCE_END.split(strip_code(text).replace("\n", ". "))
    return sum(1 for sentence in pieces if count_words(sentence) > max_words)


def count_hedges(text: str) -> int:
    return len(_HEDGE.findall(strip_code(text)))


def count_questions(text: str) -> int:
    return len(_QUESTION.findall(strip_code(text)))


_WORD = re.compile(r"[\w']+")
_ANSWERS_FOLLOWUP = re.compile(
    r"^\W*(?:sorry|i'?m sorry|i apologi[sz]e|apologies|my apologies|you'?re (?:absolutely |completely )?right|"
    r"thanks? (?:you )?for (?:your|the) (?:feedback|correction|clarification)|i understand your (?:feedback|concern))"
    r"|misunderstanding|\bmy (?:previous|last) (?:answer|response|reply)\b",
    re.I)
_FINISHED_END = re.compile(r"""[.!?\u2026:;)\]}"'`*\u201d\u2019]\s*$|^\s*(?:[-*+]|\d{1,3}[.)])\s+\S.*$|```\s*$""", re.M)
DEGENERACY_REPEAT_N = 4        # a phrase of 4 words ...
DEGENERACY_REPEAT_TIMES = 3    # ... said 3 times or more is a stutter


def repeated_phrase(text: str, n: int = DEGENERACY_REPEAT_N, times: int = DEGENERACY_REPEAT_TIMES) -> str | None:
    """The first word n-gram that occurs `times` times or more (a model stuck in a loop), else None."""
    words = [w.lower() for w in _WORD.findall(text)]
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return " ".join(gram)
    return None


def answers_the_followup(text: str) -> bool:
    """The reply talks to an earlier follow-up ("Sorry for the misunderstanding") instead of the prompt."""
    first_sentence = _SENTENCE_END.split(_plain_words(text), maxsplit=1)[0] if text.strip() else ""
    return bool(_ANSWERS_FOLLOWUP.search(first_sentence))


def looks_unfinished(text: str) -> bool:
    """Cut mid-sentence (no closing punctuation on the last line), as a reply stopped at the token limit is."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and not _FINISHED_END.search(lines[-1])


def degeneracy(text: str, ignores_request: bool = False) -> list[str]:
    """What makes a reply broken whatever the style: "empty", "repeated_phrase", "answers_followup" and,
    as the relevance rule found it (auxiliary/feedback/relevance.py: the text alone cannot tell),
    "ignores_request". The one place that decides what counts as degenerate."""
    found = []
    if not text.strip():
        found.append("empty")
    if repeated_phrase(text):
        found.append("repeated_phrase")
    if answers_the_followup(text):
        found.append("answers_followup")
    if ignores_request and text.strip():
        found.append("ignores_request")
    return found


def count_punctuation(text: str) -> int:
    return sum(1 for ch in strip_code(text) if unicodedata.category(ch).startswith("P"))


def _plain_words(text: str) -> str:
    """Text without markdown marks, emojis and leading symbols, for phrase matching."""
    text = _EMOJI.sub(" ", strip_code(text))
    text = re.sub(r"[*_#>`]+", " ", text)
    return re.sub(r"\s+", " ", text.replace("\u2019", "'")).strip()


def has_filler_opener(text: str) -> bool:
    return bool(_OPENER.match(_plain_words(text)))


def count_filler_closers(text: str) -> int:
    """Closing filler phrases in the last two sentences."""
    sentences = [s for s in _SENTENCE_END.split(_plain_words(text)) if s]
    return len(_CLOSER.findall(" ".join(sentences[-2:]))) if sentences else 0


def count_praise(text: str) -> int:
    return len(_PRAISE.findall(_plain_words(text)))


def formatting_counts(text: str) -> dict[str, int]:
    return {"headers": count_headers(text), "bold": count_bold(text), "lists": count_list_items(text),
            "tables": count_table_rows(text)}


@dataclass(frozen=True)
class StyleCheck:
    style: str
    what: str                                  # one line for the README / error messages
    problems: Callable[[str], list[str]]
    score: Callable[[str], float]


def _present(counts: dict[str, int]) -> list[str]:
    return [name for name, count in counts.items() if count > 0]


def build_style_checks(concise_max_words: int = DEFAULT_CONCISE_MAX_WORDS,
                       detailed_min_words: int = DEFAULT_DETAILED_MIN_WORDS) -> dict[str, StyleCheck]:
    """The checkable styles; the length thresholds only change when the rule USER complains
    (the rule judge compares lengths directly)."""
    if concise_max_words < 1 or detailed_min_words < 1:
        raise ValueError("word thresholds must be >= 1")

    def filler(text: str) -> list[str]:
        found = []
        if has_filler_opener(text):
            found.append("filler_opener")
        if count_praise(text):
            found.append("praise")
        if count_filler_closers(text):
            found.append("filler_closer")
        return found

    def kinds_used(text: str) -> int:
        counts = formatting_counts(text)
        return sum(1 for name in ("headers", "bold", "lists") if counts[name] > 0)

    emojis = StyleCheck("no_emojis", "no emojis or emoticons",
                        lambda t: ["emojis"] if count_emojis(t) else [], lambda t: -count_emojis(t))
    filler_check = lambda style: StyleCheck(  # noqa: E731
        style, "no filler opener, no praise, no filler closer", filler,
        lambda t: -(int(has_filler_opener(t)) + count_praise(t) + count_filler_closers(t)))

    def lists_and_headers(text: str) -> int:
        return count_list_items(text) + count_headers(text)

    def short_plain(text: str) -> list[str]:
        counts = formatting_counts(text)
        found = _present({"lists": counts["lists"], "bold": counts["bold"], "headers": counts["headers"],
                          "tables": counts["tables"]})
        return found + (["too_long"] if count_words(text) > concise_max_words else [])

    checks = [
        emojis,
        StyleCheck("writing_tics", "no emojis or emoticons", emojis.problems, emojis.score),
        StyleCheck("writing_tics_v2", "no emojis or emoticons (other formatting is fine)", emojis.problems,
                   emojis.score),
        StyleCheck("no_lists", "no list items or markdown headers",
                   lambda t: _present({"lists": count_list_items(t), "headers": count_headers(t)}),
                   lambda t: -lists_and_headers(t)),
        StyleCheck("more_lists", "at least two list items or headers (more is better)",
                   lambda t: ["no_list"] if lists_and_headers(t) < 2 else [], lists_and_headers),
        StyleCheck("formatting", "no list items, nested ones worst",
                   lambda t: ["lists"] if count_list_items(t) else [],
                   lambda t: -(count_list_items(t) + 2 * count_nested_list_items(t))),
        StyleCheck("less_formatting", "no headers, bold, list items or tables",
                   lambda t: _present(formatting_counts(t)), lambda t: -sum(formatting_counts(t).values())),
        StyleCheck("more_formatting", "uses headers, bold and lists (score = kinds used, 0-3)",
                   lambda t: ["no_formatting"] if kinds_used(t) == 0 else [], kinds_used),
        StyleCheck("answer_directly_reduce_formatting",
                   f"no lists, bold, headers or tables, at most {concise_max_words} words for the user "
                   "(the judge: less formatting, then shorter)",
                   short_plain, lambda t: -(sum(formatting_counts(t).values()) + count_words(t) / 1000)),
        filler_check("less_filler_praise_sycophancy"),
        filler_check("sycophantic_and_praise"),
        StyleCheck("no_flattery", "no praise of the user or their request",
                   lambda t: ["praise"] if count_praise(t) else [], lambda t: -count_praise(t)),
        StyleCheck("no_filler_followup", "no closing offer or filler in the last two sentences",
                   lambda t: ["filler_closer"] if count_filler_closers(t) else [],
                   lambda t: -count_filler_closers(t)),
        StyleCheck("exclamation", "no exclamation marks (the clarifying-question half is not checked)",
                   lambda t: ["exclamation"] if count_exclamations(t) else [], lambda t: -count_exclamations(t)),
        StyleCheck("no_exclamation", "no exclamation marks",
                   lambda t: ["exclamation"] if count_exclamations(t) else [], lambda t: -count_exclamations(t)),
        StyleCheck("more_exclamation", "at least one exclamation mark (more is better)",
                   lambda t: ["flat"] if not count_exclamations(t) else [], lambda t: count_exclamations(t)),
        StyleCheck("no_first_person", "no I / me / my / mine / myself",
                   lambda t: ["first_person"] if count_first_person(t) else [], lambda t: -count_first_person(t)),
        StyleCheck("no_punctuation", "no commas, dashes or semicolons",
                   lambda t: ["commas_dashes"] if count_commas_dashes_semicolons(t) else [],
                   lambda t: -count_commas_dashes_semicolons(t)),
        StyleCheck("no_punctuation_at_all", "no punctuation characters",
                   lambda t: ["punctuation"] if count_punctuation(t) else [], lambda t: -count_punctuation(t)),
        StyleCheck("committing", "no softening adverbs (generally, typically, often, usually, it depends)",
                   lambda t: ["hedging"] if count_hedges(t) else [], lambda t: -count_hedges(t)),
        StyleCheck("high_initiative", "asks the user at least one follow-up question (up to two count)",
                   lambda t: ["no_question"] if not count_questions(t) else [], lambda t: min(count_questions(t), 2)),
        StyleCheck("short_sentences", f"no sentence over {SHORT_SENTENCE_MAX_WORDS} words (fewer long ones is "
                   "better for the judge)", lambda t: ["long_sentences"] if count_long_sentences(t) else [],
                   lambda t: -count_long_sentences(t)),
        StyleCheck("concise", f"at most {concise_max_words} words for the user (shorter is better for the judge)",
                   lambda t: ["too_long"] if count_words(t) > concise_max_words else [], lambda t: -count_words(t)),
        StyleCheck("detailed", f"at least {detailed_min_words} words for the user (longer is better for the judge)",
                   lambda t: ["too_short"] if count_words(t) < detailed_min_words else [], lambda t: count_words(t)),
    ]
    return {check.style: check for check in checks}


RULE_CHECKABLE_STYLES: tuple[str, ...] = tuple(sorted(build_style_checks()))
