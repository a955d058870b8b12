"""The relevance rule: a reply that ignores its request is degenerate, whatever its style.

    scorer = RelevanceScorer.load("smollm2-135m-instruct")      # or RelevanceScorer(model, tokenizer)
    scorer.pmi(prompts, replies)              -> [nats]  log p(reply | prompt) - log p(reply | NEUTRAL_PROMPT)
    scorer.ignores_request(prompts, replies)  -> [bool]  pmi below MIN_PMI_NATS
    degenerate_reasons(prompts, replies, relevance=None) -> [[reason, ...]]  style_checks.degeneracy of each

The pointwise mutual information of the request and the reply under a small fixed chat model: how much
more likely the request makes the reply's first MAX_REPLY_TOKENS tokens than a request that asks for
nothing in particular. An answer is explained by its question ("Paris." after "What is the capital of
France?": about +5 nats, however short); "Yuck!", "I'm sorry for your loss." or the model's
self-introduction are not (about -2 to -18 nats). The threshold and how it was chosen are in
docs/evaluation.md ("Degenerate replies"). A prompt is a string or a list of chat messages.

The scores depend on the scorer model: MIN_PMI_NATS was measured on SmolLM2-135M-Instruct, the default
scorer (RELEVANCE_MODEL), which is also the policy of `make demo` before any update.
"""
from __future__ import annotations

import json
import threading
from typing import Sequence

from auxiliary.feedback.style_checks import degeneracy

RELEVANCE_MODEL = "smollm2-135m-instruct"
NEUTRAL_PROMPT = "Say something."
MIN_PMI_NATS = 2.0      # below it a reply ignores its request (docs/evaluation.md: measured, how chosen)
MAX_REPLY_TOKENS = 32   # the opening says whether a reply takes up the request; its tail only costs time


def _messages(prompt) -> list[dict]:
    from auxiliary.evals.evaluation_helpers import prompt_as_messages

    return prompt_as_messages(prompt)


class RelevanceScorer:
    """PMI of request and reply under a frozen chat model, cached per (request, reply). The arms of a run
    evaluate in threads: a lock guards the cache and the tokenizer (a fast tokenizer is not thread-safe);
    the forward passes run outside it, side by side."""

    def __init__(self, model, tokenizer, neutral_prompt: str = NEUTRAL_PROMPT, min_pmi: float | None = None,
                 max_reply_tokens: int = MAX_REPLY_TOKENS, batch_size: int = 8):
        if max_reply_tokens < 1 or batch_size < 1:
            raise ValueError("max_reply_tokens and batch_size must be >= 1")
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.neutral_prompt, self.min_pmi = neutral_prompt, min_pmi
        self.max_reply_tokens, self.batch_size = max_reply_tokens, batch_size
        self._cache: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], threading.Event] = {}  # claimed by a thread, not yet scored
        self._lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str = RELEVANCE_MODEL, device: str = "auto", **options) -> "RelevanceScorer":
        from auxiliary.runtime.model_loading import load_model_and_tokenizer

        # float32: the threshold was measured in it; a 135M model costs little either way
        model, tokenizer, _ = load_model_and_tokenizer(name_or_path, "float32", device=device)
        return cls(model, tokenizer, **options)

    def pmi(self, prompts: Sequence, replies: Sequence[str]) -> list[float]:
        """Sum over the reply's first max_reply_tokens tokens of log p(y_t | prompt) - log p(y_t | neutral);
        0.0 for an empty reply. Threads asking for the same replies (both arms at step 0) share the work:
        each claims a batch at a time that no one has scored or claimed, then waits for the others'."""
        from sdpo_objective import render_context_ids

        if len(prompts) != len(replies):
            raise ValueError(f"relevance: {len(prompts)} prompts for {len(replies)} replies")
        keys = [(json.dumps(_messages(p), sort_keys=True), r) for p, r in zip(prompts, replies)]
        with self._lock:
            tok = self.tokenizer
            neutral = render_context_ids(tok, [{"role": "user", "content": self.neutral_prompt}])
            rows = {key: (render_context_ids(tok, json.loads(key[0])),
                          tok(key[1], add_special_tokens=False)["input_ids"][:self.max_reply_tokens])
                    for key in dict.fromkeys(keys) if key not in self._cache}
        order = sorted(rows, key=lambda key: len(rows[key][0]) + len(rows[key][1]))  # similar lengths: less padding
        while True:
            with self._lock:
                claim = [key for key in order if key not in self._cache and key not in self._pending][:self.batch_size]
                if not claim:
                    waiting = [self._pending[key] for key in order if key in self._pending]
                    break
                done = threading.Event()
                self._pending.update((key, done) for key in claim)
            found = {}
            try:
                scored = [key for key in claim if rows[key][1]]
                values = self.score_batch([(*rows[key], key) for key in scored], neutral) if scored else []
                found = {**{key: 0.0 for key in claim}, **dict(zip(scored, values))}
            finally:  # a failed batch is released unscored: its error propagates here, and to the waiting below
                with self._lock:
                    self._cache.update(found)
                    for key in claim:
                        del self._pending[key]
                done.set()
        for event in waiting:
            event.wait()
        with self._lock:
            if any(key not in self._cache for key in keys):
                raise RuntimeError("relevance: another thread failed to score replies this call needs")
            return [self._cache[key] for key in keys]

    def ignores_request(self, prompts: Sequence, replies: Sequence[str]) -> list[bool]:
        threshold = MIN_PMI_NATS if self.min_pmi is None else self.min_pmi  # None: the module's, read now
        return [value < threshold for value in self.pmi(prompts, replies)]

    def score_batch(self, rows: list, neutral: list[int]) -> list[float]:
        """PMI of each (context ids, reply ids, key) row against the neutral context's ids: one forward."""
        import torch

        from sdpo_objective import build_scoring_batch, score_tokens, split_by_sequence

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        contexts = [context for context, _, _ in rows] + [neutral] * len(rows)
        replies = [reply for _, reply, _ in rows] * 2
        batch = build_scoring_batch(contexts, replies, pad, device=next(self.model.parameters()).device)
        with torch.no_grad():
            logp, _ = score_tokens(self.model, batch)
        sums = [float(values.double().sum()) for values in split_by_sequence(logp, batch)]
        return [sums[i] - sums[i + len(rows)] for i in range(len(rows))]


def degenerate_reasons(prompts: Sequence | None, replies: Sequence[str],
                       relevance: RelevanceScorer | None = None) -> list[list[str]]:
    """style_checks.degeneracy of each reply, told by `relevance` (when given) which replies ignore their
    prompt; without a scorer only the text rules apply."""
    if relevance is None or prompts is None:
        return [degeneracy(reply) for reply in replies]
    return [degeneracy(reply, ignores) for reply, ignores in zip(replies, relevance.ignores_request(prompts, replies))]
