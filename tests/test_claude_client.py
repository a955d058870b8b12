"""ClaudeClient against a real local Anthropic-compatible server (llm-katan, echo backend).

No patched client: every request goes over HTTP to 127.0.0.1. A scripted stub server is used
only for what llm-katan cannot send (a retry-after header, 403, 529, one slow answer).
"""
from __future__ import annotations

import logging
import time
import traceback

import pytest

from auxiliary.feedback.claude_client import ClaudeAuthError, ClaudeClient, ClaudeRequestError
from katan_server import (StubResponse, free_port, katan_echo, katan_factory,  # noqa: F401 (fixtures)
                                stub_factory)

PLANTED_KEY = "sk-ant-PLANTED-7f3c9e21-do-not-log"
FAST = dict(initial_backoff_s=0.01, max_backoff_s=0.05, seed=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", PLANTED_KEY)


def test_plain_completion_returns_echo_text(katan_echo):
    client = ClaudeClient(model="claude-test", base_url=katan_echo.base_url, **FAST)
    text = client.complete("You are terse.", user("How do I boil an egg?"), max_tokens=17, temperature=0.5)
    # the echo backend reports what it received: system + user = 2 messages, our max_tokens/temperature
    assert text.endswith("\nUser: How do I boil an egg?")
    assert "messages=2" in text
    assert "model=claude-test" in katan_echo.log_text()  # echo names its served model; the log has ours
    assert "max_tokens=17" in text and "temperature=0.5" in text
    default = client.complete(None, user("hi"))
    assert "messages=1" in default  # no system prompt sent
    assert "temperature=0.7" in default  # 1.0 is the API default, not sent: llm-katan uses its own 0.7
    assert client.stats["requests"] == 2 and client.stats["successes"] == 2 and client.stats["retries"] == 0


def test_endpoint_and_key_come_from_sdk_environment_variables(katan_echo, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", katan_echo.base_url)
    client = ClaudeClient(**FAST)  # no base_url, no api_key: the SDK reads both variables
    assert client.base_url.rstrip("/") == katan_echo.base_url
    assert client.complete(None, user("from env")).endswith("User: from env")
    assert PLANTED_KEY not in repr(client)


def test_missing_key_fails_at_once_naming_the_variable(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ClaudeAuthError, match="ANTHROPIC_API_KEY"):
        ClaudeClient(base_url="http://127.0.0.1:9")


def test_complete_many_keeps_order_and_bounds_concurrency(katan_factory):
    # llm-katan answers 503 as soon as more than 3 requests are in flight; each takes 0.3 s.
    server = katan_factory(latency_ms=300, max_inflight=3)
    client = ClaudeClient(base_url=server.base_url, max_concurrency=3, max_retries=0, **FAST)
    prompts = [f"question number {i}" for i in range(9)]
    start = time.monotonic()
    answers = client.complete_many([{"system": None, "messages": user(p)} for p in prompts])
    elapsed = time.monotonic() - start
    assert [a.split("User: ")[1] for a in answers] == prompts
    assert server.wait_for_requests(9) == {200: 9}  # never more than 3 in flight
    assert 0.85 <= elapsed < 3.0, elapsed  # 9 requests / 3 slots * 0.3 s = 0.9 s, not 0.3 s

    # the same server does reject a client that sends more at once, so the check above can fail
    greedy = ClaudeClient(base_url=server.base_url, max_concurrency=9, max_retries=0, **FAST)
    with pytest.raises(ClaudeRequestError, match="HTTP 503"):
        greedy.complete_many([{"messages": user(p)} for p in prompts])
    assert greedy.stats["failures"] >= 1


def test_injected_500s_are_retried_until_every_request_succeeds(katan_factory):
    server = katan_factory(error_rate=0.3)
    client = ClaudeClient(base_url=server.base_url, max_concurrency=4, max_retries=12, **FAST)
    prompts = [f"p{i}" for i in range(40)]
    answers = client.complete_many([{"system": "s", "messages": user(p)} for p in prompts])
    assert [a.split("User: ")[1] for a in answers] == prompts
    stats = client.stats
    counts = server.wait_for_requests(40 + stats["retries"])
    assert counts[200] == 40
    assert stats["retries"] == stats["retries_by_reason"]["500"] == counts[500] > 0
    assert stats["attempts"] == 40 + stats["retries"] and stats["failures"] == 0


@pytest.mark.parametrize("option,status", [("rate_limit_after", 429), ("timeout_after", 504)])
def test_permanent_429_or_504_phase_gives_up_after_max_retries(katan_factory, caplog, option, status):
    server = katan_factory(**{option: 2})
    client = ClaudeClient(base_url=server.base_url, max_retries=3, **FAST)
    assert client.complete(None, user("one")) and client.complete(None, user("two"))
    with caplog.at_level(logging.WARNING, logger="auxiliary.feedback.claude_client"):
        with pytest.raises(ClaudeRequestError, match=f"after 3 retries.*HTTP {status}"):
            client.complete(None, user("three"))
    assert client.stats["retries_by_reason"] == {str(status): 3}
    assert client.stats["failures"] == 1
    assert server.wait_for_requests(6) == {200: 2, status: 4}  # 1 try + 3 retries, no more
    retry_lines = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert [line.split(" on attempt ")[1][:3] for line in retry_lines] == ["1/4", "2/4", "3/4"]
    assert all(f"HTTP {status}" in line for line in retry_lines)


def test_retry_after_header_is_honoured(katan_echo, stub_factory):
    stub = stub_factory([StubResponse(429, {"retry-after": "0.4"}),
                         StubResponse(429, {"retry-after-ms": "250"})], upstream=katan_echo.base_url)
    # max_backoff_s caps every sleep, the server's included, so it is raised here; our own
    # jittered backoff would be below 0.02 s for these two retries
    client = ClaudeClient(base_url=stub.base_url, initial_backoff_s=0.01, max_backoff_s=2.0, seed=0)
    assert client.complete(None, user("after the phase")).endswith("User: after the phase")
    times = sorted(t for t, _ in stub.arrivals)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert sorted(status for _, status in stub.arrivals) == [200, 429, 429]
    assert 0.4 <= gaps[0] < 0.9 and 0.25 <= gaps[1] < 0.75, gaps
    assert client.stats["retries_by_reason"] == {"429": 2}
    assert client.stats["wait_s"] == pytest.approx(0.65)


def test_retry_after_is_capped_by_max_backoff(katan_echo, stub_factory):
    stub = stub_factory([StubResponse(529, {"retry-after": "120"})], upstream=katan_echo.base_url)
    client = ClaudeClient(base_url=stub.base_url, initial_backoff_s=0.01, max_backoff_s=0.2)
    start = time.monotonic()
    assert client.complete(None, user("x")).endswith("User: x")
    assert time.monotonic() - start < 2.0
    assert client.stats["retries_by_reason"] == {"529": 1} and client.stats["wait_s"] == pytest.approx(0.2)


def test_slow_answer_is_retried_as_timeout(katan_echo, katan_factory, stub_factory):
    stub = stub_factory([StubResponse(None, delay_s=1.5)], upstream=katan_echo.base_url)
    client = ClaudeClient(base_url=stub.base_url, timeout_s=0.3, **FAST)
    assert client.complete(None, user("second try")).endswith("User: second try")
    assert client.stats["retries_by_reason"] == {"timeout": 1}

    slow = katan_factory(latency_ms=1500)  # every answer too slow: bounded, then a clear error
    client = ClaudeClient(base_url=slow.base_url, timeout_s=0.3, max_retries=2, **FAST)
    start = time.monotonic()
    with pytest.raises(ClaudeRequestError, match="after 2 retries.*no answer within 0.3 s"):
        client.complete(None, user("never"))
    assert 0.9 <= time.monotonic() - start < 2.5
    assert client.stats["retries_by_reason"] == {"timeout": 2}


def test_connection_refused_is_retried_then_fails():
    client = ClaudeClient(base_url=f"http://127.0.0.1:{free_port()}", max_retries=2, **FAST)
    with pytest.raises(ClaudeRequestError, match="connection error"):
        client.complete(None, user("anyone there?"))
    assert client.stats["retries_by_reason"] == {"connection": 2}


def test_wrong_key_raises_auth_error_at_once_and_never_shows_the_key(katan_factory, caplog):
    # llm-katan echoes the received key inside its 401 body; none of it may reach us
    server = katan_factory(api_key="the-right-key")
    client = ClaudeClient(base_url=server.base_url, **FAST)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ClaudeAuthError, match="ANTHROPIC_API_KEY") as info:
            client.complete("sys", user("hello"))
    assert client.stats["retries"] == 0 and client.stats["attempts"] == 1
    assert server.wait_for_requests(1) == {401: 1}
    rendered = "".join(traceback.format_exception(info.value))
    assert "401" in rendered
    for text in (rendered, repr(info.value), caplog.text):
        assert PLANTED_KEY not in text
    assert ClaudeClient(base_url=server.base_url, api_key="the-right-key").complete(None, user("ok"))


def test_forbidden_from_stub_is_an_auth_error(stub_factory):
    stub = stub_factory([StubResponse(403)])
    client = ClaudeClient(base_url=stub.base_url, **FAST)
    with pytest.raises(ClaudeAuthError, match="403.*ANTHROPIC_API_KEY"):
        client.complete(None, user("x"))
    assert client.stats["retries"] == 0 and len(stub.arrivals) == 1


def test_bad_request_and_not_found_are_not_retried(katan_echo):
    client = ClaudeClient(base_url=katan_echo.base_url, **FAST)
    with pytest.raises(ClaudeRequestError, match="without retry.*HTTP 400.*at least one message"):
        client.complete(None, [])
    wrong_path = ClaudeClient(base_url=katan_echo.base_url + "/no/such/prefix", **FAST)
    with pytest.raises(ClaudeRequestError, match="without retry.*HTTP 404"):
        wrong_path.complete(None, user("x"))
    assert client.stats["retries"] == 0 and wrong_path.stats["retries"] == 0


def test_retry_logs_never_contain_the_key(katan_factory, caplog):
    server = katan_factory(error_rate=0.5)
    client = ClaudeClient(base_url=server.base_url, max_retries=15, **FAST)
    with caplog.at_level(logging.DEBUG):  # every logger, the SDK's and httpx's included
        client.complete_many([{"messages": user(f"q{i}")} for i in range(12)])
    assert client.stats["retries"] > 0
    assert "retry in" in caplog.text and PLANTED_KEY not in caplog.text


def test_complete_many_raises_the_first_failure(katan_echo):
    client = ClaudeClient(base_url=katan_echo.base_url, max_concurrency=2, **FAST)
    requests = [{"messages": user("fine")}, {"messages": []}, {"messages": user("fine too")}]
    with pytest.raises(ClaudeRequestError, match="HTTP 400"):
        client.complete_many(requests)
    with pytest.raises(ValueError, match="request 1 needs a 'messages' list"):
        client.complete_many([{"messages": user("a")}, {"system": "no messages"}])
    assert client.complete_many([]) == []
