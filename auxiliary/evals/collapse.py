"""Collapse monitors: signs that a policy is learning to stutter rather than to please its user.

    text_monitors(texts, prompts=None, relevance=None)
                                               -> {"degenerate_replies", "degenerate_share", "ignoring_replies",
                                                   "distinct_2", "mean_words"}
    policy_monitors(model, tokenizer, conversations, reply_texts)
                                               -> {"entropy", "logprob"} in nats per token
    collapse_warnings(record, reference)       -> list of one-line warnings
    eval_monitors(model, tokenizer, conversations, texts, baseline_texts)
                                               -> one arm's monitors at one evaluation (eval_history.json)
    reply_monitors(model, tokenizer, messages, text) -> one training reply's (metrics.jsonl rows)

- degenerate_share: the share of replies with a repeated phrase, an answer to the follow-up or
  no text (auxiliary/feedback/style_checks.degeneracy) or, given a relevance scorer
  (auxiliary/feedback/relevance.py), that ignore their request (counted alone in ignoring_replies).
- distinct_2: distinct word bigrams / all word bigrams over the replies (1.0 = no bigram repeats).
- entropy: mean entropy of the policy's next-token distribution along its own replies; a policy
  that collapses onto a loop becomes certain of every token.
- logprob: mean log-probability per token of a fixed set of replies (the baseline's) under the
  policy; its fall from step 0 is the drift away from what the initial model would write.

The thresholds (WARN_*) are deliberately loose: they flag collapse, not ordinary learning.
"""
from __future__ import annotations

import math
from typing import Sequence

from auxiliary.feedback.style_checks import count_words, degeneracy

WARN_DEGENERATE_SHARE_OVER_BASELINE = 0.10   # 3 more broken replies in 30
WARN_DISTINCT_2_RATIO = 0.75                 # distinct-2 below 75% of step 0's
WARN_ENTROPY_RATIO = 0.50                    # entropy below half of step 0's
WARN_LOGPROB_DRIFT = -1.0                    # baseline replies 1 nat per token less likely than at step 0


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    grams, total = set(), 0
    for text in texts:
        words = text.lower().split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 1.0


def text_monitors(texts: Sequence[str], prompts: Sequence | None = None, relevance=None) -> dict:
    """Degenerate replies (with a relevance scorer and the replies' prompts, those that ignore their
    request too: `ignoring_replies`), distinct-2 and mean words."""
    from auxiliary.feedback.relevance import degenerate_reasons

    n = len(texts)
    reasons = degenerate_reasons(prompts, texts, relevance)
    degenerate = sum(1 for found in reasons if found)
    ignoring = sum("ignores_request" in found for found in reasons) if relevance is not None and prompts else None
    return {"degenerate_replies": degenerate, "degenerate_share": degenerate / n if n else 0.0,
            "ignoring_replies": ignoring, "distinct_2": distinct_n(texts, 2),
            "mean_words": sum(map(count_words, texts)) / n if n else 0.0}


def policy_monitors(model, tokenizer, conversations: Sequence[Sequence[dict]], reply_texts: Sequence[str],
                    batch_size: int = 8) -> dict:
    """Mean next-token entropy and mean log-probability of the replies under `model`, per token.

    Replies are scored `batch_size` at a time, left-padded, as the objective scores (sdpo_objective.
    response_token_stats: logits only at reply positions, in chunks). Reply texts are tokenised again:
    a monitor, not the objective.
    """
    from sdpo_objective import build_scoring_batch, render_context_ids, response_token_stats

    device = next(model.parameters()).device
    pairs = [(render_context_ids(tokenizer, messages), reply) for messages, reply in
             ((m, tokenizer(t, add_special_tokens=False)["input_ids"]) for m, t in zip(conversations, reply_texts))
             if reply]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    entropy_sum, logprob_sum, tokens = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), max(1, batch_size)):
            contexts, replies = zip(*pairs[start:start + batch_size])
            logp, entropy, _ = response_token_stats(model, build_scoring_batch(contexts, replies, pad, device=device))
            entropy_sum += float(entropy.double().sum())
            logprob_sum += float(logp.double().sum())
            tokens += int(logp.numel())
    finally:
        model.train(was_training)
    if not tokens:
        return {"entropy": None, "logprob": None}
    return {"entropy": entropy_sum / tokens, "logprob": logprob_sum / tokens}


def collapse_warnings(record: dict, reference: dict, baseline_share: float | None = None) -> list[str]:
    """Warnings for one arm's monitors at one evaluation, against step 0's (`reference`)."""
    warnings = []
    if baseline_share is not None and record.get("degenerate_share") is not None and \
            record["degenerate_share"] > baseline_share + WARN_DEGENERATE_SHARE_OVER_BASELINE:
        warnings.append(f"degenerate replies {record['degenerate_share']:.0%} vs the baseline's {baseline_share:.0%}")
    if reference.get("distinct_2") and record.get("distinct_2") is not None and \
            record["distinct_2"] < WARN_DISTINCT_2_RATIO * reference["distinct_2"]:
        warnings.append(f"distinct-2 fell to {record['distinct_2']:.2f} from {reference['distinct_2']:.2f}")
    if reference.get("entropy") and record.get("entropy") is not None and \
            record["entropy"] < WARN_ENTROPY_RATIO * reference["entropy"]:
        warnings.append(f"token entropy fell to {record['entropy']:.2f} from {reference['entropy']:.2f} nats")
    if reference.get("logprob") is not None and record.get("logprob") is not None:
        drift = record["logprob"] - reference["logprob"]
        if math.isfinite(drift) and drift < WARN_LOGPROB_DRIFT:
            warnings.append(f"baseline replies drifted {drift:+.2f} nats per token under the policy")
    return warnings


def eval_monitors(model, tokenizer, conversations, texts: Sequence[str], baseline_texts: Sequence[str],
                  relevance=None) -> dict:
    """The monitors of one arm at one evaluation: its replies' text monitors (`relevance`: a RelevanceScorer
    that also counts replies ignoring their request), the policy's entropy on them and the
    log-probability of the baseline's replies under the policy (nats per token)."""
    own = policy_monitors(model, tokenizer, conversations, texts)
    # step 0 answers with the baseline's replies: the same forward passes, done once
    on_baseline = own if list(texts) == list(baseline_texts) else policy_monitors(model, tokenizer, conversations,
                                                                                  baseline_texts)
    return {**text_monitors(texts, conversations, relevance), "entropy": own["entropy"],
            "logprob": on_baseline["logprob"]}


def relative_to_start(record: dict, start: dict | None) -> dict:
    """entropy_ratio (entropy / step 0's) and logprob_drift (logprob - step 0's) of an eval record."""
    out = {}
    if start and start.get("entropy") and record.get("entropy") is not None:
        out["entropy_ratio"] = record["entropy"] / start["entropy"]
    if start and start.get("logprob") is not None and record.get("logprob") is not None:
        out["logprob_drift"] = record["logprob"] - start["logprob"]
    return out


def reply_monitors(model, tokenizer, messages, text: str) -> dict:
    """One training reply: whether it is degenerate, its distinct-2 ratio and the policy's mean token
    entropy along it (the step's own reply, scored before the update)."""
    return {"degenerate": bool(degeneracy(text)), "distinct_2": distinct_n([text], 2),
            "entropy": policy_monitors(model, tokenizer, [messages], [text])["entropy"]}
