"""The one door to the Anthropic Messages API used by every Claude component.

Simulated users and judges call `ClaudeClient.complete` / `complete_many`; this module owns
authentication, the endpoint, bounded concurrency and the retry policy, so that none of them
needs to know about HTTP:

- Retries happen only on 429, 408, 5xx (529 overloaded included), connection errors and
  timeouts: exponential backoff with full jitter from a seeded RNG, capped at max_backoff_s,
  and a server's `retry-after` / `retry-after-ms` header is obeyed (also capped). At most
  `max_retries` retries, then `ClaudeRequestError`. Each retry is logged with its reason.
- 401/403 raise `ClaudeAuthError` at once; 400, 404 and other client errors raise
  `ClaudeRequestError` at once.
- The API key never appears in a log line or an exception message: we build our own
  messages, scrub the key from any server text we quote, and do not chain SDK exceptions
  (a proxy may echo the key back inside its error body).

`anthropic` is imported inside the constructor so that nothing else needs it installed.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
DEFAULT_MODEL = "claude-haiku-4-5-20251001"


def to_claude_request(messages: list[dict]) -> dict:
    """Chat messages -> {"system", "messages"} as the Messages API wants them (system apart)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    return {"system": system, "messages": [m for m in messages if m["role"] != "system"]}


class ClaudeAuthError(RuntimeError):
    """The API refused the credentials (401/403) or no key was given."""


class ClaudeRequestError(RuntimeError):
    """A request the API rejected for good (400, 404, ...) or whose retries ran out."""


def _is_retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _parse_retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait, from `retry-after-ms` or `retry-after` (seconds)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except (TypeError, ValueError):
            continue  # an HTTP date or garbage: fall back to our own backoff
        if seconds >= 0:
            return seconds
    return None


class ClaudeClient:
    """Thread-safe Messages API client with bounded concurrency and our own retry loop."""

    def __init__(self, model: str = DEFAULT_MODEL, max_concurrency: int = 8, max_retries: int = 8,
                 timeout_s: float = 60.0, base_url: str | None = None, api_key: str | None = None,
                 initial_backoff_s: float = 1.0, max_backoff_s: float = 60.0, seed: int | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0 or initial_backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("timeout_s must be > 0 and the backoff times >= 0")
        key = api_key if api_key else os.environ.get(API_KEY_ENV, "")
        if not key:
            raise ClaudeAuthError(
                f"No Anthropic API key: set the {API_KEY_ENV} environment variable "
                f"(or pass api_key) to use a Claude user simulator or judge.")
        import anthropic  # lazy: only Claude components need the SDK

        self._anthropic = anthropic
        self._key = key
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        # base_url=None lets the SDK read ANTHROPIC_BASE_URL itself (its documented behaviour).
        # The SDK sends `Authorization: Bearer`; the real API and Anthropic-compatible proxies
        # such as llm-katan check `x-api-key`, so we send that header as well.
        self._sdk = anthropic.Anthropic(
            api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0,
            default_headers={"x-api-key": key})
        self.base_url = str(self._sdk.base_url)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"requests": 0, "attempts": 0, "successes": 0, "failures": 0,
                                       "retries": 0, "retries_by_reason": {}, "wait_s": 0.0}

    def __repr__(self) -> str:  # never shows the key
        return f"ClaudeClient(model={self.model!r}, base_url={self.base_url!r}, max_concurrency={self.max_concurrency})"

    @property
    def stats(self) -> dict:
        """A snapshot of the counters: requests (complete calls), attempts (HTTP calls),
        successes, failures, retries, retries_by_reason {"429"|"500"|...|"timeout"|"connection": n},
        wait_s (total backoff slept)."""
        with self._lock:
            snapshot = dict(self._stats)
            snapshot["retries_by_reason"] = dict(self._stats["retries_by_reason"])
        return snapshot

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._stats[name] += amount

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _backoff_s(self, retry_index: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * (2 ** retry_index))
        with self._lock:  # random.Random is not safe to share between threads without a lock
            return self._rng.uniform(0.0, ceiling)

    def _classify(self, err: Exception) -> tuple[str | None, float | None, str]:
        """(retry reason or None when final, retry-after seconds, short description)."""
        anthropic = self._anthropic
        if isinstance(err, anthropic.APITimeoutError):
            return "timeout", None, f"no answer within {self.timeout_s:g} s"
        if isinstance(err, anthropic.APIConnectionError):
            return "connection", None, "connection error"
        if isinstance(err, anthropic.APIStatusError):
            status = err.status_code
            body = err.body if isinstance(err.body, dict) else {}
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            detail = f"HTTP {status}"
            if error.get("type"):
                detail += f" {error['type']}"
            if error.get("message"):
                detail += f": {self._scrub(str(error['message']))[:300]}"
            reason = str(status) if _is_retryable_status(status) else None
            return reason, _parse_retry_after(err.response.headers), detail
        return None, None, f"{type(err).__name__}"

    def complete(self, system: str | None, messages: list[dict], max_tokens: int = 256,
                 temperature: float | None = 1.0) -> str:
        """Text of one Messages API reply (text blocks joined)."""
        self._count("requests")
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "messages": messages}
        if system:
            kwargs["system"] = system
        # anthropic >= 1.0 dropped `temperature` from create()'s signature and models after
        # Opus 4.6 reject non-default values, so 1.0 (the API default) and None are not sent
        # at all and other values travel in the JSON body, where haiku-4-5 still honours them.
        if temperature is not None and temperature != 1.0:
            kwargs["extra_body"] = {"temperature": temperature}
        for attempt in range(1, self.max_retries + 2):
            self._count("attempts")
            try:
                with self._slots:
                    response = self._sdk.messages.create(**kwargs)
            except self._anthropic.APIError as err:
                reason, retry_after, detail = self._classify(err)
                status = getattr(err, "status_code", None)
                if status in (401, 403):
                    self._count("failures")
                    raise ClaudeAuthError(
                        f"Claude API refused the credentials ({detail.split(':')[0]}) at {self.base_url}: "
                        f"check the {API_KEY_ENV} environment variable (the key is not shown).") from None
                if reason is None:
                    self._count("failures")
                    raise ClaudeRequestError(
                        f"Claude API request failed without retry ({detail}) at {self.base_url}, "
                        f"model {self.model!r}.") from None
                if attempt > self.max_retries:
                    self._count("failures")
                    logger.error("Claude API: giving up after %d attempts; last error %s", attempt, detail)
                    raise ClaudeRequestError(
                        f"Claude API request failed after {self.max_retries} retries "
                        f"(last error: {detail}) at {self.base_url}.") from None
                wait_s = self._backoff_s(attempt - 1, retry_after)
                with self._lock:
                    self._stats["retries"] += 1
                    by_reason = self._stats["retries_by_reason"]
                    by_reason[reason] = by_reason.get(reason, 0) + 1
                    self._stats["wait_s"] += wait_s
                logger.warning("Claude API: %s on attempt %d/%d; retry in %.2f s%s", detail, attempt,
                               self.max_retries + 1, wait_s,
                               " (server retry-after)" if retry_after is not None else "")
                time.sleep(wait_s)  # outside the concurrency slot: a waiting request frees its slot
                continue
            self._count("successes")
            return "".join(getattr(block, "text", "") for block in response.content
                           if getattr(block, "type", None) == "text")
        raise AssertionError("unreachable")  # the loop either returns or raises

    def complete_many(self, requests: list[dict], max_tokens: int = 256,
                      temperature: float | None = 1.0) -> list[str]:
        """requests: [{"system": str|None, "messages": [{"role","content"}]}]; results in input
        order; at most max_concurrency in flight. The first failure (in input order) is raised
        after cancelling the requests not yet started."""
        for index, request in enumerate(requests):
            if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
                raise ValueError(f"complete_many: request {index} needs a 'messages' list, got {request!r:.200}")
        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="claude") as pool:
            futures = [pool.submit(self.complete, request.get("system"), request["messages"],
                                   max_tokens, temperature) for request in requests]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
