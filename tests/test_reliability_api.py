"""Online runs of eval_online_sdpo.py with a Claude user (and judge) against a real local server
speaking the Anthropic Messages API: llm-katan (echo backend) with injected faults, reached through
ANTHROPIC_BASE_URL, sometimes behind a scripted stub for faults that llm-katan cannot produce
(a 429 phase with retry-after that ends, a 504 phase that ends, one answer slower than the timeout,
a 401 in the middle of a run). The ClaudeClient policy itself is tested in test_claude_client.py.

What "every verdict obtained" means here: the server answered every judge request (both orders of
every pair, at every evaluation). The echo backend repeats the judge prompt, whose last line reads
'..."Judgement: A", "Judgement: B" or "Judgement: C"', so each reply parses as A in both orders:
position-bound verdicts, which the protocol turns into ties (none is unparseable).
"""
from __future__ import annotations

import logging
import re
import time

import pytest

import eval_online_sdpo
from katan_server import StubResponse, katan_factory, stub_factory  # noqa: F401 (fixtures)
from reliability_helpers import data_dir, one_torch_thread  # noqa: F401 (fixtures)
from reliability_helpers import ERROR_PREFIX, leftover_temp_files, online_args, read_json, read_jsonl

PLANTED_KEY = "sk-ant-PLANTED-reliability-api-5150"
RETRY_LINE = re.compile(r"Claude API: (HTTP (\d{3})|no answer within)[^\n]* on attempt (\d+)/(\d+); retry in")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _api_env(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", PLANTED_KEY)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.delenv("OUTPUT_DIR", raising=False)


@pytest.fixture()
def short_backoff(monkeypatch):
    """The Claude clients' backoff base at 0.1 s instead of 1 s (a flag could still set it): the same retries,
    counted the same, a tenth of the sleeping. The backoff itself is tested in test_claude_client.py."""
    from functools import partialmethod

    from auxiliary.feedback.claude_client import ClaudeClient

    monkeypatch.setattr(ClaudeClient, "__init__", partialmethod(ClaudeClient.__init__, initial_backoff_s=0.1))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


@pytest.mark.usefixtures("short_backoff")
def test_twenty_interactions_survive_500s_429s_504s_and_a_timeout(tiny_model_dir, data_dir, tmp_path, katan_factory,
                                                                  stub_factory, monkeypatch, caplog):
    katan = katan_factory(error_rate=0.3, latency_ms=20)
    forward = StubResponse(None)
    # Scripted phases in order of arrival, after the first evaluation's burst (8 judge requests and
    # their retries), so that they fall on the one-at-a-time follow-up requests of the training steps.
    # A request can meet a whole phase and then 500s: --api_max_retries 12 keeps the chance that one
    # request runs out of retries below 1e-4.
    script = ([forward] * 14 + [StubResponse(429, {"retry-after": "0.3"})] * 3  # a rate-limit phase that ends
              + [forward] * 6 + [StubResponse(504)] * 2                       # a gateway-timeout phase
              + [forward] * 6 + [StubResponse(200, delay_s=6.0)])             # slower than --api_timeout_s
    stub = stub_factory(script, upstream=katan.base_url)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.base_url)  # the endpoint comes from the SDK's variable
    out = tmp_path / "run"
    argv = online_args(tiny_model_dir, data_dir, out, user_simulator="claude", judge="claude", train_n=20, eval_every=0,
                       api_concurrency=3, api_timeout_s=2.0, api_max_retries=12)
    with caplog.at_level(logging.INFO):
        assert eval_online_sdpo.main(argv) == 0
    log = (out / "run.log").read_text()

    # every follow-up is the server's answer to this step's own reply: nothing made up or reused
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    replies = {r["step"]: r["completion"] for r in read_jsonl(out / "completions.jsonl") if r["phase"] == "train"}
    for m in metrics:
        followup = m["feedback"]["followup"]
        assert followup.startswith("[echo]") and f"<reply>\n{replies[m['step']].strip()}\n</reply>" in followup

    # every judge request answered: 2 evaluations (start, end) x 4 prompts x 2 orders
    history = read_json(out / "eval_history.json")
    assert [r["step"] for r in history] == [0, 20]
    for record in history:
        assert record["n"] == 4 and record["unparseable_verdicts"] == 0
        assert record["ties"] == 4  # echo verdicts are "A" in both orders: disagreement -> tie

    # the server's view: each of the 20 + 16 requests answered once with 200; every 500 was retried
    retries = [(m.group(2) or "timeout", int(m.group(3)), int(m.group(4))) for m in RETRY_LINE.finditer(log)]
    katan_counts = katan.wait_for_requests(36 + sum(1 for reason, *_ in retries if reason == "500"))
    assert katan_counts[200] == 36
    by_reason = {reason: sum(1 for r, *_ in retries if r == reason) for reason in {r for r, *_ in retries}}
    assert by_reason.pop("429") == 3 and by_reason.pop("504") == 2 and by_reason.pop("timeout") == 1
    assert by_reason.pop("500") == katan_counts[500] > 0  # P(no 500 in 36+ requests at 30%) < 1e-5
    assert by_reason == {}
    assert all(total == 13 and attempt <= 12 for _, attempt, total in retries)  # bounded by --api_max_retries
    assert log.count("(server retry-after)") == 3
    # the per-client summary lines add up to the same numbers
    usage = dict(re.findall(r"Claude API \((user|judge concise)\): (\d+ requests, \d+ retries)", log))
    assert usage["user"].startswith("20 requests") and usage["judge concise"].startswith("16 requests")
    assert sum(int(u.split(", ")[1].split()[0]) for u in usage.values()) == len(retries)
    assert PLANTED_KEY not in log


def test_retries_are_bounded_then_the_run_stops_with_a_clear_line(tiny_model_dir, data_dir, tmp_path, stub_factory,
                                                                   monkeypatch, capsys):
    stub = stub_factory([StubResponse(503)] * 10)  # overloaded for longer than the run is willing to wait
    monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.base_url)
    out = tmp_path / "run"
    code = eval_online_sdpo.main(online_args(tiny_model_dir, data_dir, out, user_simulator="claude", api_max_retries=2))
    err = capsys.readouterr().err
    assert code == 1 and stub.received == 3  # 1 try + 2 retries, then no further request
    assert len(error_lines(err)) == 1
    assert "after 2 retries (last error: HTTP 503" in error_lines(err)[0] and "--resume" in error_lines(err)[0]
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and not leftover_temp_files(out)


def test_refused_key_mid_run_stops_at_once_keeps_finished_steps_and_resumes(tiny_model_dir, data_dir, tmp_path,
                                                                           katan_factory, stub_factory, monkeypatch,
                                                                           capsys):
    katan = katan_factory()
    stub = stub_factory([StubResponse(None)] * 3 + [StubResponse(401)], upstream=katan.base_url)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.base_url)
    out = tmp_path / "run"
    argv = online_args(tiny_model_dir, data_dir, out, user_simulator="claude", train_n=5, eval_every=0,
                       save_checkpoints=True, checkpoint_every=3)
    code = eval_online_sdpo.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and stub.received == 4  # the 401 is not retried
    assert len(error_lines(err)) == 1 and "Traceback" not in err
    line = error_lines(err)[0]
    assert "ClaudeAuthError" in line and "HTTP 401" in line and "ANTHROPIC_API_KEY" in line
    assert PLANTED_KEY not in err
    # nothing half-written: the finished steps, complete files, no temporary leftovers
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in read_json(out / "eval_history.json")] == [0]
    assert read_json(out / "checkpoints" / "latest.json")["step"] == 3
    assert not leftover_temp_files(out)

    # with the key fixed (here: the server answering again), --resume finishes the run
    monkeypatch.setenv("ANTHROPIC_BASE_URL", katan.base_url)
    assert eval_online_sdpo.main(argv + ["--resume"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_json(out / "eval_history.json")] == [0, 5]


@pytest.mark.parametrize("concurrency,expect_ok", [(2, True), (4, False)])
def test_api_concurrency_bounds_requests_in_flight(concurrency, expect_ok, tiny_model_dir, data_dir, tmp_path,
                                                   katan_factory, monkeypatch, capsys):
    # llm-katan answers 503 as soon as more than 2 requests are in flight; each takes 0.3 s; no retries
    katan = katan_factory(latency_ms=300, max_inflight=2)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", katan.base_url)
    argv = online_args(tiny_model_dir, data_dir, tmp_path / "run", judge="claude", train_n=1, eval_every=0,
                       api_concurrency=concurrency, api_max_retries=0)
    started = time.monotonic()
    code = eval_online_sdpo.main(argv)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    if expect_ok:  # 2 evaluations x 8 judge requests, 2 at a time: at least 8 x 0.3 s
        assert code == 0, err
        assert katan.wait_for_requests(16) == {200: 16} and elapsed >= 2.4
    else:  # the negative control: the same server does reject 4 at a time
        assert code == 1 and "HTTP 503" in error_lines(err)[0]
