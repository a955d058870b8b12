"""Simulated user played by Claude through auxiliary/claude_client.ClaudeClient.

    ClaudeUserSimulator(style, model="claude-haiku-4-5-20251001", api_concurrency=8, max_tokens=150,
                        temperature=0.0, client=None, seed=None, empty_retries=2, **client_kwargs)
    .generate_feedback(prompts, completions, seed=None) -> list[str]

The prompt is user_simulator.build_simulator_messages (persona as system prompt). All pairs
go out concurrently (at most api_concurrency in flight) via ClaudeClient.complete_many, which
retries 429/5xx/timeouts and raises ClaudeAuthError / ClaudeRequestError otherwise: a follow-up
is always Claude's own answer, never a substitute. An empty answer is asked again up to
`empty_retries` times, then EmptyFeedbackError. client_kwargs (max_retries, timeout_s,
base_url, api_key, ...) go to ClaudeClient; or pass a ready `client`. The per-call `seed` is
accepted like every user's, but the Messages API has no sampling seed: replies are not
reproducible (the constructor's `seed` only seeds the client's retry jitter).
"""
from __future__ import annotations

import logging

from auxiliary.feedback.claude_client import to_claude_request
from auxiliary.feedback.user_simulator import (UserSimulator, build_simulator_messages, clean_feedback,
                                              retry_empty_feedback)

logger = logging.getLogger(__name__)


class ClaudeUserSimulator(UserSimulator):
    def __init__(self, style: str, model: str | None = None, api_concurrency: int = 8, max_tokens: int = 150,
                 temperature: float | None = 0.0, client=None, seed: int | None = None, empty_retries: int = 2,
                 **client_kwargs):
        from auxiliary.feedback.claude_client import DEFAULT_MODEL, ClaudeClient

        self.style = style
        self.max_tokens, self.temperature, self.empty_retries = max_tokens, temperature, empty_retries
        self.client = client or ClaudeClient(model=model or DEFAULT_MODEL, max_concurrency=api_concurrency,
                                             seed=seed, **client_kwargs)

    def api_usage(self) -> dict:
        return self.client.stats

    def _ask(self, requests: list[dict]) -> list[str]:
        answers = self.client.complete_many(requests, max_tokens=self.max_tokens, temperature=self.temperature)
        return [clean_feedback(a) for a in answers]

    def _feedback(self, prompts, completions, seed):  # no API seed to pass it to
        requests = [to_claude_request(build_simulator_messages(self.style, p, c)) for p, c in zip(prompts, completions)]
        return retry_empty_feedback(
            self._ask(requests), lambda indices, _attempt: self._ask([requests[i] for i in indices]),
            self.empty_retries, "Claude user",
            "Claude returned empty follow-ups for items {items} " f"after {self.empty_retries} retries")
