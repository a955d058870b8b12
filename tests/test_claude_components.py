"""ClaudeUserSimulator and ClaudeStyleJudge against a real local Anthropic Messages API server
(llm-katan, echo backend): every request goes over HTTP to 127.0.0.1, no patched client.

The echo backend answers "[echo] model=... messages=N max_tokens=M temperature=T\\nUser: <last user
message>", so a reply shows exactly what our component sent.
"""
import pytest

from auxiliary.feedback.claude_client import ClaudeAuthError
from auxiliary.feedback.claude_style_judge import ClaudeStyleJudge
from auxiliary.feedback.claude_user_simulator import ClaudeUserSimulator
from auxiliary.feedback.personas import UnknownStyleError
from auxiliary.feedback.style_judge import parse_verdict
from auxiliary.feedback.factory import make_judge
from auxiliary.feedback.factory import make_user_simulator
from katan_server import katan_echo, katan_factory  # noqa: F401 (fixtures)

FAST = dict(initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-components")


def test_user_simulator_requests_reach_the_server_in_order(katan_echo):
    sim = ClaudeUserSimulator("no_emojis", model="claude-test", api_concurrency=3, base_url=katan_echo.base_url,
                              seed=0, **FAST)
    assert sim.client.max_concurrency == 3 and sim.client.model == "claude-test"
    before = sum(katan_echo.status_counts().values())
    completions = [f"Reply number {i} \U0001F600" for i in range(5)]
    feedback = sim.generate_feedback([f"Request {i}" for i in range(5)], completions)
    assert len(feedback) == 5
    for i, text in enumerate(feedback):
        # system prompt travels apart from the messages: the echo sees one user message
        assert text.startswith("[echo]") and "messages=2" in text and "max_tokens=150" in text
        assert "temperature=0.0" in text  # greedy, as the paper's Claude user
        assert f"<request>\nRequest {i}\n</request>" in text and f"Reply number {i} \U0001F600" in text
    counts = katan_echo.wait_for_requests(before + 5)
    assert counts[200] - before == 5 and sim.client.stats["successes"] == 5
    # a per-call seed is accepted like every user's (the API has no seed: nothing more to check)
    assert len(sim.generate_feedback(["Request 0"], [completions[0]], seed=123)) == 1
    assert sim.api_usage() == sim.client.stats and sim.problems(completions[0]) is None


def test_style_judge_sends_both_orders_and_parses_each_reply(katan_echo):
    judge = make_judge("claude", "concise", model_name_or_path="claude-test", api_concurrency=4,
                       base_url=katan_echo.base_url, **FAST)
    assert isinstance(judge, ClaudeStyleJudge) and judge.client.max_concurrency == 4
    comparison = judge.compare_detailed(["q1", "q2"], ["short A1", "short A2"], ["longer B1 text", "longer B2 text"])
    decisions = comparison.decisions
    assert len(decisions) == 2 and set(decisions) <= {"A", "B", "C"}
    outputs = judge.last_outputs
    assert len(outputs) == 4 and all(o.startswith("[echo]") for o in outputs)
    # greedy with up to 512 tokens, as the paper's Claude judge; the persona is the system message (user framing)
    assert all("max_tokens=512" in o and "temperature=0.0" in o for o in outputs)

    def order(text, x, y):
        return text.index(f"<response_a>\n{x}") < text.index(f"<response_b>\n{y}")

    assert order(outputs[0], "short A1", "longer B1 text") and order(outputs[1], "short A2", "longer B2 text")
    assert order(outputs[2], "longer B1 text", "short A1") and order(outputs[3], "longer B2 text", "short A2")
    assert comparison.verdicts == [(parse_verdict(outputs[0]), parse_verdict(outputs[2])),
                                   (parse_verdict(outputs[1]), parse_verdict(outputs[3]))]
    assert judge.client.stats["requests"] == 4 and judge.api_usage() == judge.client.stats


def test_every_follow_up_is_obtained_despite_server_errors(katan_factory):
    server = katan_factory(error_rate=0.3)
    sim = make_user_simulator("claude", "concise", model_name_or_path="claude-test", api_concurrency=4,
                              base_url=server.base_url, max_retries=20, **FAST)
    completions = [f"completion {i}" for i in range(20)]
    feedback = sim.generate_feedback(["prompt"] * 20, completions)
    assert all(f"completion {i}" in text for i, text in enumerate(feedback))  # each its own answer, in order
    counts = server.wait_for_requests(20 + sim.client.stats["retries"])
    assert counts[200] == 20 and counts[500] == sim.client.stats["retries"] > 0  # P(no 500 in 20) < 0.1%


def test_refused_credentials_stop_at_once(katan_factory):
    server = katan_factory(api_key="the-right-key")
    sim = ClaudeUserSimulator("no_emojis", base_url=server.base_url, api_key="a-wrong-key", **FAST)
    with pytest.raises(ClaudeAuthError, match="ANTHROPIC_API_KEY"):
        sim.generate_feedback(["q"], ["r"])
    judge = ClaudeStyleJudge("no_emojis", base_url=server.base_url, api_key="a-wrong-key", **FAST)
    with pytest.raises(ClaudeAuthError):
        judge.compare(["q"], ["a"], ["b"])
    with pytest.raises(UnknownStyleError):
        ClaudeUserSimulator("not-a-style", base_url=server.base_url)
