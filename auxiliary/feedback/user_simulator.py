"""Simulated users: given the request and the assistant's reply, write the user's next message.

Interface (every simulator)
    sim.generate_feedback(prompts, completions, seed=None) -> list[str]
        prompts: strings or conversations (see evaluation_helpers.prompt_as_text); one
        follow-up per (prompt, completion) pair, in input order, never empty. `seed` is the
        randomness of this call (an online run passes one derived from (seed, arm, step));
        None: the simulator's own `seed` from its constructor. What a kind does with it:
        rule/neutral seed the wording RNG, local and vLLM seed the sampling (a retry of an
        empty message adds retry_seed's offset), Claude accepts it but the Messages API takes
        no seed, so its replies are not reproducible.
    sim.problems(completion) -> list[str] | None
        What the simulator would complain about, by rule; None for a simulator without rules
        (every kind but the rule user).
    sim.api_usage() -> dict | None
        Request counters of an API client (Claude); None for the others.

Simulators
    RuleBasedUserSimulator(style, seed=0, concise_max_words=60, detailed_min_words=150)
        For the styles in RULE_USER_STYLES (checks in auxiliary/feedback/style_checks.py). No model.
        A reply with problems gets one varied natural sentence per problem (at most two) naming
        what the user dislikes; a reply without problems gets a short varied approval. The
        wording is drawn from an RNG seeded by (seed, style, prompt, completion): the same
        inputs always give the same message (so a resumed run replays it), different replies
        give varied messages.
    NeutralUserSimulator(texts=None, seed=0)
        The placebo arm's user: always a content-free approval drawn from `texts`
        (default ("OK, thanks.",)), whatever the reply.
    LocalHFUserSimulator(model_name_or_path | (model, tokenizer), style, max_new_tokens=96,
                         temperature=0.7, top_p=0.95, batch_size=8, seed=None, dtype/device="auto")
        A local chat model prompted with build_simulator_messages, batched HF generation.
    ClaudeUserSimulator / VLLMUserSimulator: auxiliary/feedback/claude_user_simulator.py,
        auxiliary/feedback/vllm_user_simulator.py (imported only when used).

    make_user_simulator(kind, style, model_name_or_path=None, seed=0, api_concurrency=8, **kw)
        kind in {"rule", "local", "claude", "vllm"} (and "neutral" for the placebo); extra
        keyword arguments go to the simulator's constructor.

Errors: an unknown style raises personas.UnknownStyleError (listing the known styles); a style
the rule user cannot check raises UnsupportedStyleError listing RULE_USER_STYLES; a model that
keeps returning empty messages raises EmptyFeedbackError (no made-up follow-up is ever used).

Prompt shared by every model-based simulator (build_simulator_messages): the persona is the
system message, followed by role-play rules: write your next message, briefly, judging only
how the reply fits your preferences, never answering the request yourself.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from auxiliary.evals.evaluation_helpers import Prompt, prompt_as_text
from auxiliary.feedback.personas import PersonaStyle, UnknownStyleError, get_persona
from auxiliary.feedback.style_checks import (DEFAULT_CONCISE_MAX_WORDS, DEFAULT_DETAILED_MIN_WORDS,
                                    RULE_CHECKABLE_STYLES, build_style_checks)
from auxiliary.runtime.seeds import seeded_rng

logger = logging.getLogger(__name__)

RULE_USER_STYLES: tuple[str, ...] = RULE_CHECKABLE_STYLES
DEFAULT_NEUTRAL_TEXTS = ("OK, thanks.",)


class UnsupportedStyleError(ValueError):
    """A known style that a rule-based component cannot check."""


class EmptyFeedbackError(RuntimeError):
    """A model-based simulator produced no usable follow-up."""


SIMULATOR_RULES = """\
You are role-playing this person in a chat with an AI assistant. You will see a request you sent \
and the assistant's reply. Write the next message you would send to the assistant.
- React only to how well the reply suits your preferences above (tone, length, format, wording). \
Do not judge whether its facts are right.
- If something in it goes against your preferences, say plainly what bothers you. If it suits you, \
say so briefly.
- Never answer or redo the request yourself, never rewrite the reply, and do not ask about a new topic.
- One or two short sentences in your own voice. Output only the message, without quotes or labels."""


def build_simulator_messages(style: str, prompt: Prompt, completion: str) -> list[dict]:
    """[system: persona + role-play rules, user: the request and the reply]."""
    persona = get_persona(style)
    request = (f"Your request:\n<request>\n{prompt_as_text(prompt).strip()}\n</request>\n\n"
               f"The assistant's reply:\n<reply>\n{completion.strip()}\n</reply>\n\n"
               "Write your next message to the assistant.")
    return [{"role": "system", "content": f"{persona}\n\n{SIMULATOR_RULES}"},
            {"role": "user", "content": request}]


_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S)
_LABEL = re.compile(r"^\s*[*_]*(?:user|me|my (?:next )?message|next message|message|follow-?up|response)"
                    r"[*_]*\s*:[*_]*\s*", re.I)


def clean_feedback(text: str) -> str:
    """Strip a thinking block, a leading "User:"-style label and wrapping quotes from a model's message."""
    text = _THINK.sub("", text or "").strip()
    text = _LABEL.sub("", text, count=1).strip()
    for left, right in (('"', '"'), ("\u201c", "\u201d"), ("'", "'")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[1:-1].strip()
    return text


def retry_empty_feedback(feedback: list[str], regenerate, retries: int, who: str, failure: str) -> list[str]:
    """Ask again (up to `retries` times) for the follow-ups that came back empty; raise if some stay empty.

    `regenerate(indices, attempt)` returns new texts for those indices. Shared by every model-based user,
    so no made-up follow-up is ever used in place of a missing one.
    """
    for attempt in range(1, retries + 1):
        empty = [i for i, text in enumerate(feedback) if not text]
        if not empty:
            break
        logger.warning("%s: %d empty follow-ups, asking again (%d/%d)", who, len(empty), attempt, retries)
        for i, text in zip(empty, regenerate(empty, attempt)):
            feedback[i] = text
    empty = [i for i, text in enumerate(feedback) if not text]
    if empty:
        raise EmptyFeedbackError(failure.format(items=empty[:10]))
    return feedback


def retry_seed(seed: int | None, attempt: int) -> int | None:
    """The sampling seed of the `attempt`-th retry: a new draw, still a function of the call's seed."""
    return None if seed is None else seed + 7919 * attempt


class UserSimulator:
    """Base class; subclasses implement _feedback for validated inputs."""

    style = PersonaStyle()  # checked on assignment: an unknown style fails as the component is built
    seed: int | None = None  # the default seed of a call that passes none

    def generate_feedback(self, prompts: Sequence[Prompt], completions: Sequence[str],
                          seed: int | None = None) -> list[str]:
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"generate_feedback: {len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        feedback = self._feedback(prompts, completions, self.seed if seed is None else seed)
        if len(feedback) != len(prompts):
            raise RuntimeError(f"{type(self).__name__} returned {len(feedback)} follow-ups for {len(prompts)} replies")
        return feedback

    def _feedback(self, prompts: list[Prompt], completions: list[str], seed: int | None) -> list[str]:
        raise NotImplementedError

    def problems(self, completion: str) -> list[str] | None:
        return None  # no rules: only the rule user knows what it would complain about

    def api_usage(self) -> dict | None:
        return None


# --------------------------------------------------------------------------- rule-based

COMPLAINTS: dict[str, tuple[str, ...]] = {
    "emojis": ("Please leave out the emojis.", "Could you write that without emojis?",
               "The emojis are distracting, plain text please.", "Drop the emojis, they feel childish to me.",
               "I'd rather not see emojis in your answers."),
    "lists": ("Please don't use bullet points, just write normal sentences.",
              "Can you write that as a paragraph instead of a list?", "Too many bullet points. I prefer prose.",
              "Skip the list format next time, connected sentences read better to me.",
              "I find numbered lists hard to read, please use plain paragraphs."),
    "no_list": ("Could you put that into a bullet list? It's easier for me to scan.",
                "A list of steps would help me a lot here.", "Please break that into bullet points.",
                "That's a wall of text for me, can you use a numbered list?"),
    "headers": ("No headings please, it's a short answer.", "The section headers feel like overkill.",
                "Please drop the headings, plain text is enough.", "Why the titles? Just write it normally."),
    "bold": ("Please stop putting words in bold.", "All that bold text is distracting.",
             "Less bold, please. It looks cluttered.", "You don't need to bold things for me."),
    "tables": ("A table is too much here, just write it out.", "Please don't use tables, plain text is fine."),
    "no_formatting": ("Could you add some structure, like headings or bold key points?",
                      "This is hard to navigate. Please use headings and bullet points.",
                      "Some formatting would help, maybe bold the important parts.",
                      "Please organise it with sections and lists next time."),
    "filler_opener": ("Skip the intro and just answer.", "No need for the 'Sure' opener, get to the point.",
                      "Please drop the preamble at the start.", "Just start with the answer next time.",
                      "The opening line is filler, cut it."),
    "praise": ("You don't need to compliment my question.", "Please skip the flattery.",
               "No need to tell me it's a great question.", "The praise feels fake, just answer.",
               "Less buttering up, please."),
    "filler_closer": ("You can skip the closing line offering more help.",
                      "No need for the 'let me know' at the end.", "Please just stop when the answer is done.",
                      "The sign-off at the end is unnecessary.", "Drop the 'hope this helps' ending."),
    "exclamation": ("Please tone down the exclamation marks.",
                    "Fewer exclamation marks, please. It sounds overexcited.",
                    "Can you say it calmly, without the exclamation marks?",
                    "The exclamation marks feel insincere to me."),
    "flat": ("That sounds a bit flat. Could you be more enthusiastic?", "Show some excitement, this is fun stuff.",
             "Can you sound a little more upbeat?", "A bit more energy would be nice."),
    "first_person": ("Please don't talk about yourself, just state the information.",
                     "Leave yourself out of it, no 'I' or 'my' please.",
                     "I don't need to hear what you think, just the facts, impersonally.",
                     "Can you phrase it without the first person?"),
    "punctuation": ("please write without punctuation", "no commas or periods please just words",
                    "drop the punctuation marks", "i said no punctuation at all"),
    "commas_dashes": ("Please write without commas or dashes or semicolons.",
                      "Too many commas and dashes for my taste. Short plain sentences please.",
                      "Drop the semicolons and dashes. Just use full stops.",
                      "I really dislike commas and dashes. Please avoid them."),
    "hedging": ("Just commit to an answer, no 'generally' or 'usually'.", "Less hedging please, be definite.",
                "Stop softening everything with 'typically'. Give me a firm answer.",
                "Please drop the qualifiers and commit to one answer."),
    "no_question": ("Could you ask me what I need next instead of stopping there?",
                    "Ask me a follow-up question next time, help me move this forward.",
                    "I'd like you to drive this a bit. What should we look at next? Ask me.",
                    "You could ask me something to keep this going."),
    "long_sentences": ("Your sentences are too long for me, keep each one short.",
                       "Please split those long sentences up.", "Shorter sentences, please. I lose track.",
                       "One idea per sentence would be easier for me to read."),
    "too_long": ("That's too long. Please keep it short.", "Can you make it much shorter?",
                 "Way too much text, just the key point please.", "Shorter please, a few sentences at most.",
                 "Too wordy for me. Be brief."),
    "too_short": ("That's too short. Can you go into more detail?", "Please explain more, with an example.",
                  "I need a more thorough answer than that.", "Can you expand on that? It's a bit thin."),
}
APPROVALS: tuple[str, ...] = (
    "Thanks, that works.", "Good, that's what I needed.", "Perfect, thanks.", "That's fine, thank you.",
    "Great, got it.", "Nice, that's helpful.", "OK, that's useful, thanks.", "Thanks, this is good.",
    "Works for me.", "Clear enough, thanks.", "That's exactly the kind of answer I like.", "Good answer, thanks.",
)
_MAX_COMPLAINTS = 2


class RuleBasedUserSimulator(UserSimulator):
    def __init__(self, style: str, seed: int = 0, concise_max_words: int = DEFAULT_CONCISE_MAX_WORDS,
                 detailed_min_words: int = DEFAULT_DETAILED_MIN_WORDS):
        self.style = style  # unknown style -> UnknownStyleError listing the known ones
        checks = build_style_checks(concise_max_words=concise_max_words, detailed_min_words=detailed_min_words)
        if style not in checks:
            raise UnsupportedStyleError(
                f"the rule-based user cannot check style {style!r}; rule-checkable styles: "
                f"{', '.join(RULE_USER_STYLES)} (use a model-based user: local, claude or vllm)")
        self.seed = seed
        self.check = checks[style]

    def problems(self, completion: str) -> list[str]:
        return self.check.problems(completion)

    def _message(self, prompt: Prompt, completion: str, seed: int) -> str:
        rng = seeded_rng(seed, self.style, prompt_as_text(prompt), completion)
        problems = self.problems(completion)
        if not problems:
            return rng.choice(APPROVALS)
        chosen = problems if len(problems) <= _MAX_COMPLAINTS else rng.sample(problems, _MAX_COMPLAINTS)
        return " ".join(rng.choice(COMPLAINTS[p]) for p in chosen)

    def _feedback(self, prompts, completions, seed):
        return [self._message(p, c, seed) for p, c in zip(prompts, completions)]


class NeutralUserSimulator(UserSimulator):
    """Placebo user: the same kind of content-free approval whatever the reply."""

    def __init__(self, texts: Sequence[str] | None = None, seed: int = 0):
        texts = tuple(DEFAULT_NEUTRAL_TEXTS if texts is None else texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError(f"NeutralUserSimulator needs non-empty texts, got {texts!r}")
        self.texts = texts
        self.seed = seed

    def _feedback(self, prompts, completions, seed):
        return [seeded_rng(seed, "neutral", prompt_as_text(p), c).choice(self.texts)
                for p, c in zip(prompts, completions)]


# --------------------------------------------------------------------------- local HF model

def load_local_model(model_name_or_path, dtype: str, device: str):
    """(model, tokenizer) from a path/name or an already loaded pair."""
    if isinstance(model_name_or_path, (tuple, list)):
        if len(model_name_or_path) != 2:
            raise ValueError("pass a model name/path or a (model, tokenizer) pair")
        return tuple(model_name_or_path)
    if not model_name_or_path:
        raise ValueError("a local model-based component needs model_name_or_path")
    from auxiliary.runtime.model_loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(model_name_or_path, dtype=dtype, device=device)
    return model, tokenizer


class LocalHFUserSimulator(UserSimulator):
    def __init__(self, model_name_or_path, style: str, max_new_tokens: int = 96, temperature: float = 0.7,
                 top_p: float = 0.95, batch_size: int = 8, seed: int | None = None, dtype: str = "auto",
                 device: str = "auto", empty_retries: int = 2, progress: bool = False):
        self.style = style
        self.model, self.tokenizer = load_local_model(model_name_or_path, dtype, device)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size, self.seed, self.empty_retries, self.progress = batch_size, seed, empty_retries, progress

    def _generate(self, conversations: list[list[dict]], seed: int | None) -> list[str]:
        from auxiliary.runtime.generation import generate_responses

        replies = generate_responses(self.model, self.tokenizer, conversations, max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size,
                                     seed=seed, progress=self.progress, desc="simulated user")
        return [clean_feedback(r.text) for r in replies]

    def _feedback(self, prompts, completions, seed):
        conversations = [build_simulator_messages(self.style, p, c) for p, c in zip(prompts, completions)]
        feedback = self._generate(conversations, seed)

        def regenerate(indices, attempt):
            return self._generate([conversations[i] for i in indices], retry_seed(seed, attempt))

        # Sampling again can fix an empty message; greedy decoding would only repeat it.
        retries = self.empty_retries if self.temperature > 0 else 0
        return retry_empty_feedback(
            feedback, regenerate, retries, "simulated user",
            "the local user model gave empty follow-ups for items {items} "
            f"(max_new_tokens={self.max_new_tokens}); try another model or more tokens")


__all__ = ["UserSimulator", "RuleBasedUserSimulator", "NeutralUserSimulator", "LocalHFUserSimulator",
           "build_simulator_messages", "clean_feedback", "RULE_USER_STYLES",
           "UnknownStyleError", "UnsupportedStyleError", "EmptyFeedbackError", "retry_empty_feedback", "retry_seed",
           "COMPLAINTS", "APPROVALS"]
