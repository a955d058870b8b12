"""Pairwise style judges: which of two replies better fits a user's style?

Interface (every judge)
    judge.compare(prompts, completions_a, completions_b) -> list[str]
        "A": completions_a fits the style better, "B": completions_b does, "C": tie.
        Protocol: each pair is judged twice, (a, b) and (b, a), in one batch. A decision counts
        only when both orders agree on the same reply; disagreement, a tie in either order or an
        unparseable verdict gives "C". judge.stats counts pairs, agreements, disagreements and
        unparseable verdicts over the judge's life.
    judge.compare_detailed(prompts, completions_a, completions_b) -> Comparison
        the same judging, returning .decisions, .verdicts (the raw (forward, backward) verdict
        of each pair) and .unparseable (how many of the 2n verdicts could not be parsed).
    judge.api_usage() -> dict | None: request counters of an API client (Claude), else None.
    Subclasses implement judge_once(prompts, first, second) -> list["A"|"B"|"C"|None]
    (verdict for one order: "A" = first is better; None = could not parse).

Judges
    RuleBasedJudge(style)                          scores the checkable property
                                                   (auxiliary/feedback/style_checks.py); equal scores -> C
    LocalHFJudge(model_name_or_path | (model, tokenizer), style, mode="generate"|"logprob",
                 max_new_tokens=192, batch_size=8, dtype/device="auto")
        generate: batched greedy generation of build_judge_messages, then parse_verdict.
        logprob:  the prompt asks for the verdict line only; after the assistant prefix
                  "Judgement:" the summed log-probs of the continuations " A", " B", " C" are
                  compared and the largest wins (no generation, never unparseable).
    ClaudeStyleJudge / VLLMStyleJudge: auxiliary/feedback/claude_style_judge.py, auxiliary/feedback/vllm_style_judge.py.

    Built by auxiliary/feedback/factory.py (make_judge, build_judges), the one module that
    knows every kind.

Verdict parsing (parse_verdict): the LAST "Judgement: X" (or "Judgment") line wins; markdown
(**Judgement:** **B**), quotes, JSON ("judgement": "a"), lowercase, "Response B", "tie" and a
verdict on the line after the label are understood. Without such a line, labels such as
"Verdict:", "Final answer:" or "Winner:" are tried, then a reply whose last line is a lone
letter. A letter is only taken as a whole word: "Both" is not B and "a tie" is a tie, not A.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from auxiliary.evals.evaluation_helpers import Prompt, prompt_as_text
from auxiliary.feedback.personas import PersonaStyle, get_persona
from auxiliary.feedback.style_checks import RULE_CHECKABLE_STYLES, build_style_checks, looks_unfinished
from auxiliary.feedback.user_simulator import UnsupportedStyleError, load_local_model
from auxiliary.runtime.option_groups import JUDGE_FRAMINGS, RANGES, check_in_range

VERDICTS = ("A", "B", "C")
JUDGEMENT_PREFIX = "Judgement:"
RULE_JUDGE_STYLES: tuple[str, ...] = RULE_CHECKABLE_STYLES
_SWAPPED = {"A": "B", "B": "A", "C": "C"}

# --------------------------------------------------------------------------- parsing

_PRIMARY_LABEL = r"judge?ment"
_SECONDARY_LABEL = r"(?:final\s+)?(?:verdict|answer|decision|winner|choice)|better\s+response"
# the next line is read through a lookahead so that it can still hold a later label of its own
_AFTER_LABEL = r"[\s*_`\"'\)\]]*(?:[:=]|\bis\b)[ \t]*([^\n]*)(?=(?:\n[ \t]*([^\n]*))?)"
_SKIP_WORDS = {"response", "assistant", "option", "answer", "output", "candidate", "reply", "the", "is", "verdict"}
_TIE_WORDS = {"tie", "tied", "draw", "neither", "equal", "equally", "both", "same", "c"}


def _verdict_from_words(rest: str) -> str | None:
    words = re.findall(r"[A-Za-z]+", rest)
    index = 0
    while index < len(words) and words[index].lower() in _SKIP_WORDS:
        index += 1
    if index == len(words):
        return None
    word, following = words[index], [w.lower() for w in words[index + 1:index + 2]]
    if word in ("A", "B", "C"):
        return word
    lower = word.lower()
    if lower == "a" and following and following[0] in _TIE_WORDS:
        return "C"  # "a tie", "a draw"
    if lower in ("a", "b") and (not following or following[0] in ("is", "wins", "better")):
        return lower.upper()
    if lower in _TIE_WORDS:
        return "C"
    return None


def _labelled_verdicts(text: str, label: str) -> list[str]:
    found = []
    for match in re.finditer(rf"(?<![A-Za-z])(?:{label})(?![A-Za-z]){_AFTER_LABEL}", text, re.I):
        same_line, next_line = match.group(1), match.group(2) or ""
        verdict = _verdict_from_words(same_line) if re.search(r"[A-Za-z]",
                                                              same_line) else _verdict_from_words(next_line)
        if verdict:
            found.append(verdict)
    return found


def parse_verdict(text: str | None) -> str | None:
    """"A", "B", "C" or None; see the module docstring."""
    if not text or not text.strip():
        return None
    for label in (_PRIMARY_LABEL, _SECONDARY_LABEL):
        verdicts = _labelled_verdicts(text, label)
        if verdicts:
            return verdicts[-1]
    last_line = [line for line in text.strip().splitlines() if line.strip()][-1]
    bare = re.sub(r"[\s*_`\"'()\[\]{}<>.,:;!]+", "", last_line)
    if bare in ("A", "B", "C", "a", "b", "c"):
        return bare.upper()
    return None


# --------------------------------------------------------------------------- prompt

NEUTRAL_JUDGE_SYSTEM = "You are an impartial, careful judge of writing style."
USER_JUDGE_RULES = (
    "You are this user. An assistant answered one of your requests twice, and you decide, as yourself, which "
    "reply better matches your preferences. Judge style only: tone, formatting, verbosity and complexity. Do "
    "not judge correctness or helpfulness, and do not favour a reply for coming first or second.")


def _verdict_instruction(explain: bool) -> str:
    lines = " or ".join(f'"{JUDGEMENT_PREFIX} {label}"' for label in VERDICTS).replace(' or "', ', "', 1)
    if explain:
        return f"Explain your reasoning in at most two sentences, then end with a final line that is exactly {lines}."
    return f"Answer with one line only: {lines}."


def build_judge_messages(style: str, prompt: Prompt, response_a: str, response_b: str,
                         explain: bool = True, framing: str = "user") -> list[dict]:
    """[system, user] asking which response better fits the persona's style; verdict A, B or C (tie).

    framing "user" (the paper's protocol, the default): the persona is the system message and the
    judge decides as that user. framing "neutral": an impartial referee reads the persona as a
    profile of someone else. explain=False asks for the verdict line only (the log-prob judge).
    """
    if framing not in JUDGE_FRAMINGS:
        raise ValueError(f"unknown judge framing {framing!r}; choose one of {', '.join(JUDGE_FRAMINGS)}")
    persona = get_persona(style)
    candidates = (f"Request:\n<request>\n{prompt_as_text(prompt).strip()}\n</request>\n\n"
                  f"Response A:\n<response_a>\n{response_a.strip()}\n</response_a>\n\n"
                  f"Response B:\n<response_b>\n{response_b.strip()}\n</response_b>\n\n")
    labels = ("A means Response A fits better, B means Response B fits better, C means a tie (equally well or "
              "equally badly).\n" + _verdict_instruction(explain))
    if framing == "user":
        content = ("Here is your request and the two replies.\n\n" + candidates +
                   "Which reply better matches your own style preferences? " + labels)
        return [{"role": "system", "content": f"{persona}\n\n{USER_JUDGE_RULES}"}, {"role": "user", "content": content}]
    content = (
        "A user sent the request below and received two candidate responses. This is the user's profile, "
        "written to the user:\n"
        f"<profile>\n{persona}\n</profile>\n\n" + candidates +
        "Which response better matches this user's style preferences? Judge style only: tone, length, format, "
        "wording and whatever the profile mentions. Ignore factual accuracy and helpfulness beyond the profile, "
        "and do not favour a response for its position. " + labels)
    return [{"role": "system", "content": NEUTRAL_JUDGE_SYSTEM}, {"role": "user", "content": content}]


# --------------------------------------------------------------------------- protocol

def combine_verdicts(forward: str | None, backward: str | None) -> str:
    """forward judged (a, b), backward judged (b, a): a win counts only when both orders agree."""
    if forward in ("A", "B") and backward is not None and _SWAPPED.get(backward) == forward:
        return forward
    return "C"


@dataclass(frozen=True)
class Comparison:
    """One compare call: a decision per pair and the two raw verdicts it came from."""

    decisions: list[str]
    verdicts: list[tuple[str | None, str | None]]  # (forward, backward) per pair; None = unparseable

    @property
    def unparseable(self) -> int:
        return sum(v is None for pair in self.verdicts for v in pair)


class PairwiseJudge:
    style = PersonaStyle()  # checked on assignment: an unknown style fails as the judge is built

    def __init__(self, framing: str = "user"):
        if framing not in JUDGE_FRAMINGS:
            raise ValueError(f"unknown judge framing {framing!r}; choose one of {', '.join(JUDGE_FRAMINGS)}")
        self.framing = framing  # how model-based judges are prompted (build_judge_messages)
        self.stats: Counter = Counter()

    def judge_once(self, prompts: list[Prompt], first: list[str], second: list[str]) -> list[str | None]:
        raise NotImplementedError

    def api_usage(self) -> dict | None:
        return None

    def compare(self, prompts: Sequence[Prompt], completions_a: Sequence[str],
                completions_b: Sequence[str]) -> list[str]:
        return self.compare_detailed(prompts, completions_a, completions_b).decisions

    def compare_detailed(self, prompts: Sequence[Prompt], completions_a: Sequence[str],
                         completions_b: Sequence[str]) -> Comparison:
        prompts, a, b = list(prompts), list(completions_a), list(completions_b)
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"compare: {len(prompts)} prompts, {len(a)} completions_a, {len(b)} completions_b")
        if not prompts:
            return Comparison([], [])
        n = len(prompts)
        verdicts = list(self.judge_once(prompts + prompts, a + b, b + a))
        if len(verdicts) != 2 * n:
            raise RuntimeError(f"{type(self).__name__}.judge_once returned {len(verdicts)} verdicts for {2 * n}")
        bad = [v for v in verdicts if v is not None and v not in VERDICTS]
        if bad:
            raise RuntimeError(f"{type(self).__name__}.judge_once returned invalid verdicts {bad[:5]!r}")
        pairs = list(zip(verdicts[:n], verdicts[n:]))
        decisions = [combine_verdicts(f, r) for f, r in pairs]
        for (forward, backward), decision in zip(pairs, decisions):
            self.stats["pairs"] += 1
            self.stats["unparseable"] += (forward is None) + (backward is None)
            if decision != "C":
                self.stats["agreed_decisive"] += 1
            elif forward is not None and backward is not None and _SWAPPED[backward] != forward:
                self.stats["disagreements"] += 1
        return Comparison(decisions, pairs)


class RuleBasedJudge(PairwiseJudge):
    """`relevance` (auxiliary/feedback/relevance.RelevanceScorer, optional): a reply that ignores its request
    is broken too."""

    def __init__(self, style: str, relevance=None):
        super().__init__()
        self.relevance = relevance
        self.style = style  # unknown style -> UnknownStyleError listing the known ones
        checks = build_style_checks()
        if style not in checks:
            raise UnsupportedStyleError(
                f"the rule-based judge cannot check style {style!r}; rule-checkable styles: "
                f"{', '.join(RULE_JUDGE_STYLES)} (use a model-based judge: local, claude or vllm)")
        self.check = checks[style]

    def judge_once(self, prompts, first, second):
        from auxiliary.feedback.relevance import degenerate_reasons

        broken = [bool(r) for r in degenerate_reasons(list(prompts) * 2, list(first) + list(second), self.relevance)]
        n = len(first)
        return [self._verdict(x, y, broken[i], broken[n + i]) for i, (x, y) in enumerate(zip(first, second))]

    def _verdict(self, x: str, y: str, broken_x: bool, broken_y: bool) -> str:
        """A broken reply (style_checks.degeneracy: a repeated phrase, an answer to the follow-up, empty, or
        with a relevance scorer one that ignores the request) never wins on style: it loses to a sound reply
        and ties with another broken one; then a reply cut mid-sentence loses to a finished one; only then
        the style scores decide."""
        if broken_x or broken_y:
            return "C" if broken_x and broken_y else "B" if broken_x else "A"
        cut_x, cut_y = looks_unfinished(x), looks_unfinished(y)
        if cut_x != cut_y:
            return "B" if cut_x else "A"
        sx, sy = self.check.score(x), self.check.score(y)
        return "A" if sx > sy else "B" if sy > sx else "C"


class LocalHFJudge(PairwiseJudge):
    """Greedy generation (up to 1,024 tokens, as the paper's local judges), or label log-probs (`logprob`):
    there a verdict counts only when its label beats the runner-up by `tie_margin` nats, else a tie."""

    def __init__(self, model_name_or_path, style: str, mode: str = "generate", max_new_tokens: int = 1024,
                 batch_size: int = 8, dtype: str = "auto", device: str = "auto", progress: bool = False,
                 framing: str = "user", tie_margin: float = 0.05, temperature: float = 0.0):
        super().__init__(framing)
        self.temperature = temperature
        check_in_range("tie_margin", tie_margin, RANGES)
        self.tie_margin = tie_margin
        if mode not in ("generate", "logprob"):
            raise ValueError(f"LocalHFJudge mode must be 'generate' or 'logprob', got {mode!r}")
        self.style, self.mode = style, mode
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress
        self.model, self.tokenizer = load_local_model(model_name_or_path, dtype, device)
        self.last_outputs: list[str] = []
        self.last_label_logprobs: list[dict[str, float]] = []

    def judge_once(self, prompts, first, second):
        if self.mode == "generate":
            from auxiliary.runtime.generation import generate_responses

            conversations = [build_judge_messages(self.style, p, x, y, framing=self.framing)
                             for p, x, y in zip(prompts, first, second)]
            replies = generate_responses(self.model, self.tokenizer, conversations, max_new_tokens=self.max_new_tokens,
                                         temperature=self.temperature, batch_size=self.batch_size,
                                         progress=self.progress,
                                         desc="style judge")
            self.last_outputs = [r.text for r in replies]
            return [parse_verdict(text) for text in self.last_outputs]
        conversations = [build_judge_messages(self.style, p, x, y, explain=False, framing=self.framing)
                         for p, x, y in zip(prompts, first, second)]
        self.last_label_logprobs = label_logprobs(self.model, self.tokenizer, conversations, self.batch_size)
        return [margin_verdict(scores, self.tie_margin) for scores in self.last_label_logprobs]


def margin_verdict(scores: dict[str, float], tie_margin: float) -> str:
    """The best label when it beats the runner-up by `tie_margin`, else "C" (a tie)."""
    best, runner_up = sorted(VERDICTS, key=scores.__getitem__, reverse=True)[:2]
    return best if scores[best] - scores[runner_up] >= tie_margin else "C"


def _label_continuations(tokenizer) -> tuple[list[int], dict[str, list[int]]]:
    """Token ids of the "Judgement:" prefix and of each label as it continues that prefix."""
    prefix = tokenizer(JUDGEMENT_PREFIX, add_special_tokens=False)["input_ids"]
    continuations = {}
    for label in VERDICTS:
        full = tokenizer(f"{JUDGEMENT_PREFIX} {label}", add_special_tokens=False)["input_ids"]
        if full[:len(prefix)] == prefix and len(full) > len(prefix):
            continuations[label] = full[len(prefix):]
        else:  # the tokenizer merged across the boundary: tokenize the label on its own
            continuations[label] = tokenizer(f" {label}", add_special_tokens=False)["input_ids"]
    return prefix, continuations


def label_logprobs(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[dict[str, float]]:
    """For each conversation: {label: sum log p(label tokens | chat context + "Judgement:")}.
    Sequences are left-padded so every label ends at the last position, and only the last
    (longest label + 1) positions go through the LM head (logits_to_keep)."""
    import torch

    from sdpo_objective import render_context_ids

    prefix, continuations = _label_continuations(tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []  # (conversation index, label, ids)
    for index, conversation in enumerate(conversations):
        context = render_context_ids(tokenizer, conversation) + prefix
        rows.extend((index, label, context + continuations[label]) for label in VERDICTS)
    results: list[dict[str, float]] = [{} for _ in conversations]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size * len(VERDICTS)):
                chunk = rows[start:start + batch_size * len(VERDICTS)]
                width = max(len(ids) for _, _, ids in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (_, _, ids) in enumerate(chunk):
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attention[row, width - len(ids):] = 1
                positions = (attention.cumsum(-1) - 1).clamp(min=0)
                keep = max(len(continuations[label]) for _, label, _ in chunk) + 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                               position_ids=positions.to(device), logits_to_keep=keep).logits.float()
                logprobs = torch.log_softmax(logits, dim=-1)  # [rows, keep, vocab]; position j predicts token j+1
                for row, (index, label, _) in enumerate(chunk):
                    targets = continuations[label]
                    offset = keep - 1 - len(targets)
                    total = sum(logprobs[row, offset + j, token].item() for j, token in enumerate(targets))
                    results[index][label] = total
    finally:
        model.train(was_training)
    return results
