"""Pairwise style judge played by Claude through auxiliary/claude_client.ClaudeClient.

    ClaudeStyleJudge(style, model="claude-haiku-4-5-20251001", api_concurrency=8, max_tokens=512,
                     temperature=0.0, client=None, seed=None, framing="user", **client_kwargs)
    .compare(prompts, completions_a, completions_b) -> ["A"|"B"|"C"]   (style_judge.PairwiseJudge)

Both orders of every pair go out in one concurrent batch (ClaudeClient.complete_many, at most
api_concurrency in flight). Failed requests raise (ClaudeAuthError / ClaudeRequestError after
the client's retries); a reply without a parseable verdict counts as None, which the protocol
turns into a tie, that compare_detailed(...).unparseable and judge.stats["unparseable"] count. The
raw replies of the last call are in judge.last_outputs. Greedy (temperature 0) with up to 512
tokens, as the paper's Claude judge; a temperature of 1.0 (the API default) is not sent at all.
"""
from __future__ import annotations

from auxiliary.feedback.claude_client import to_claude_request
from auxiliary.feedback.style_judge import PairwiseJudge, build_judge_messages, parse_verdict


class ClaudeStyleJudge(PairwiseJudge):
    def __init__(self, style: str, model: str | None = None, api_concurrency: int = 8, max_tokens: int = 512,
                 temperature: float | None = 0.0, client=None, seed: int | None = None, framing: str = "user",
                 **client_kwargs):
        from auxiliary.feedback.claude_client import DEFAULT_MODEL, ClaudeClient

        super().__init__(framing)
        self.style = style
        self.max_tokens, self.temperature = max_tokens, temperature
        self.client = client or ClaudeClient(model=model or DEFAULT_MODEL, max_concurrency=api_concurrency,
                                             seed=seed, **client_kwargs)
        self.last_outputs: list[str] = []

    def api_usage(self) -> dict:
        return self.client.stats

    def judge_once(self, prompts, first, second):
        requests = [to_claude_request(build_judge_messages(self.style, p, x, y, framing=self.framing))
                    for p, x, y in zip(prompts, first, second)]
        self.last_outputs = self.client.complete_many(requests, max_tokens=self.max_tokens,
                                                      temperature=self.temperature)
        return [parse_verdict(text) for text in self.last_outputs]
