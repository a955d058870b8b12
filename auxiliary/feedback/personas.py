"""User personas: who the simulated user is and what they want from a reply.

A persona is a short description written to the simulated user ("You ..."). Model-based
user simulators get it as their system message; style judges get the same text as the
definition of the style they judge. Every description here is our own wording.

Interface
    PERSONAS: dict[str, str]      style name -> persona description
    list_styles() -> list[str]    the known style names, sorted
    get_persona(style) -> str     raises UnknownStyleError (a ValueError listing the known styles)

Styles: the 8 combinations `{concise,detailed}_{casual,professional}_{beginner,expert}`,
plus single-preference profiles (no_emojis, less_filler_praise_sycophancy,
answer_directly_reduce_formatting, poetic, no_punctuation, no_first_person, ...).
Which of them a program can check is decided in `auxiliary/feedback/style_checks.py`.
"""
from __future__ import annotations

from itertools import product

_LENGTH = {
    "concise": "You want short answers: a few sentences that get to the point, with no padding, "
               "no long introductions and no recap at the end.",
    "detailed": "You want thorough answers that explain the reasoning, cover the cases that matter and "
                "give concrete examples; a two-line answer feels lazy to you.",
}
_TONE = {
    "casual": "You write casually, the way you would text a friend, and you like replies in the same "
              "relaxed, plain-spoken voice; stiff or corporate wording puts you off.",
    "professional": "You expect a polished, professional tone, like a work e-mail from a competent "
                    "colleague; slang, jokes and chummy phrasing put you off.",
}
_EXPERTISE = {
    "beginner": "You are new to most topics: jargon and unexplained terms lose you, and you value "
                "plain words and simple, everyday examples.",
    "expert": "You already know the field well: basic definitions and hand-holding waste your time, "
              "and you want precise terminology and the non-obvious details.",
}


def _combined_personas() -> dict[str, str]:
    return {f"{length}_{tone}_{level}": " ".join((_LENGTH[length], _TONE[tone], _EXPERTISE[level]))
            for length, tone, level in product(_LENGTH, _TONE, _EXPERTISE)}


_SINGLE_PREFERENCE = {
    "no_emojis": (
        "You find emojis in written answers childish and distracting. Any emoji or emoticon in a reply "
        "annoys you, wherever it appears; you want plain text only."),
    "less_filler_praise_sycophancy": (
        "You dislike padding and flattery. Openers such as 'Great question!' or 'Sure, I'd be happy to "
        "help!', compliments about your request, and closing lines such as 'I hope this helps!' or "
        "'Let me know if you need anything else' irritate you. You want the substance and nothing else."),
    "answer_directly_reduce_formatting": (
        "You want the answer in the first sentence, with no preamble, and you prefer plain prose: "
        "headings, bold text and bullet lists make a reply feel like a slide deck to you. Use structure "
        "only when the content truly cannot be written as a paragraph."),
    "poetic": (
        "You love language with some music in it. You enjoy replies written with imagery, rhythm and a "
        "touch of poetry, even for practical questions; flat, purely functional prose bores you."),
    "no_punctuation": (
        "You have an odd taste: you like text with no punctuation marks at all, no commas, periods, "
        "question marks or exclamation marks, just words and line breaks. Punctuation in a reply bothers you."),
    "no_first_person": (
        "You do not want the assistant to talk about itself. Replies that say 'I', 'me', 'my' or "
        "'I think' feel self-centred to you; you want the information stated impersonally."),
    "clarification_first": (
        "Your requests are often underspecified, and you prefer an assistant that first asks one or two "
        "short clarifying questions about what you actually need before giving a full answer. A long "
        "answer built on guesses about your situation frustrates you."),
    "single_answer": (
        "You want one recommendation, not a menu. Lists of options, 'it depends' and several "
        "alternatives side by side make you do the work; you want the single best answer."),
    "answer_first": (
        "You want the bottom line first. The direct answer should come in the opening sentence, and any "
        "explanation or background after it; replies that build up slowly to the point annoy you."),
    "no_filler_followup": (
        "You dislike replies that end with offers or questions such as 'Would you like me to...?', "
        "'Let me know if you have other questions' or 'Feel free to ask'. Once the answer is given, the "
        "reply should simply stop."),
    "high_initiative": (
        "You like an assistant that takes initiative: it anticipates the next problem, suggests a "
        "concrete next step and points out what you did not think to ask. Replies that answer only the "
        "literal question feel passive to you."),
    "committing": (
        "You want an assistant that commits. Hedging such as 'it might', 'possibly', 'it depends on many "
        "factors' or a balanced overview without a conclusion frustrates you; you want a clear, "
        "confident position."),
    "no_lists": (
        "You dislike bullet points and numbered lists. You want replies written as connected sentences "
        "and paragraphs; a list of fragments feels lazy and hard to read to you."),
    "more_lists": (
        "You skim. You like replies organised as bullet points or numbered steps that you can scan "
        "quickly; long paragraphs make you lose patience."),
    "more_formatting": (
        "You like richly structured replies: headings for sections, bold for the key points and lists for "
        "steps. A plain block of text is hard for you to navigate."),
    "less_formatting": (
        "You dislike markdown decoration. Headings, bold and italic text, bullet lists and tables in a "
        "reply look cluttered to you; you want plain, simple text."),
    "opinionated": (
        "You value an assistant with a point of view. You want it to say what it thinks is best and why, "
        "not to list pros and cons neutrally and leave the decision entirely to you."),
    "exclamation": (
        "You like energy and enthusiasm. Replies that sound upbeat and excited, with exclamation marks, "
        "make you happy; a flat, monotone reply feels cold to you."),
    "no_exclamation": (
        "You find exclamation marks grating. You want a calm, even tone; replies that exclaim, even once, "
        "sound overexcited and insincere to you."),
    "no_sycophantic": (
        "You cannot stand flattery. Replies that praise your question, call your idea great, agree with "
        "you just to please you or gush about how happy they are to help put you off; you want a neutral, "
        "honest reply."),
    "concise": (
        "You are busy. You want short replies, a few sentences at most, that answer exactly what you "
        "asked; every extra paragraph costs you time."),
    "detailed": (
        "You are curious and patient. You want long, thorough replies that explain the why as well as the "
        "how, with examples and the relevant caveats; short answers leave you unsatisfied."),
}

PERSONAS: dict[str, str] = {**_combined_personas(), **_SINGLE_PREFERENCE}


class UnknownStyleError(ValueError):
    """A style name that has no persona; the message lists the known styles."""

    def __init__(self, style: str, known: list[str] | None = None, what: str = "style"):
        known = sorted(PERSONAS) if known is None else list(known)
        self.style = style
        self.known = known
        super().__init__(f"unknown {what} {style!r}; known styles: {', '.join(known)}")


def list_styles() -> list[str]:
    return sorted(PERSONAS)


def get_persona(style: str) -> str:
    try:
        return PERSONAS[style]
    except (KeyError, TypeError):
        raise UnknownStyleError(style) from None
