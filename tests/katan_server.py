"""Local servers speaking the Anthropic Messages API, for tests of every Claude component.

`start_katan(**failure_options)` runs llm-katan (echo backend, anthropic provider) as a
subprocess on a free 127.0.0.1 port, waits until /health answers and returns a `KatanServer`
(`.base_url`, `.status_counts()`, `.stop()`). The echo reply is
"[echo] model=... messages=N max_tokens=M temperature=T\\nUser: <last user message>".
Failure injection (llm-katan's own, echo backend only):
    error_rate=0.3        HTTP 500 on that fraction of requests
    latency_ms=500        delay before every reply (a client timeout below it -> timeouts)
    rate_limit_after=N    429 for every request after the first N (no retry-after header)
    timeout_after=N       504 for every request after the first N
    max_inflight=K        503 when more than K requests are in flight at once
    api_key="..."         validate the x-api-key value (wrong key -> 401)

`start_stub(script, upstream=...)` is a tiny loopback HTTP server for what llm-katan cannot
produce (a `retry-after` header, 403, 529, a slow first answer): it plays the scripted
responses in order, then forwards further requests to `upstream` (e.g. a KatanServer URL).

Usage in a test module (pytest finds fixtures imported into the module):
    from katan_server import katan_factory, stub_factory   # tests/ is on sys.path under pytest
    def test_x(katan_factory, monkeypatch):
        server = katan_factory(error_rate=0.3)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
or, outside pytest: `with katan_server(latency_ms=200) as server: ...`.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
_ACCESS_LINE = re.compile(r'"POST (\S+) HTTP/[\d.]+" (\d{3})')


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class KatanServer:
    base_url: str
    port: int
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def status_counts(self, path: str = "/v1/messages") -> Counter:
        """HTTP status -> number of requests the server answered (from uvicorn's access log)."""
        counts: Counter = Counter()
        for match in _ACCESS_LINE.finditer(self.log_text()):
            if match.group(1) == path:
                counts[int(match.group(2))] += 1
        return counts

    def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> Counter:
        """Status counts once the access log holds n requests (it is written just after replying)."""
        deadline = time.monotonic() + timeout_s
        counts = self.status_counts()
        while sum(counts.values()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
            counts = self.status_counts()
        return counts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llm-katan exited with code {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llm-katan did not answer on {url} within {STARTUP_TIMEOUT_S:g} s")


def start_katan(error_rate: float = 0.0, latency_ms: int = 0, rate_limit_after: int = 0,
                timeout_after: int = 0, max_inflight: int = 0, api_key: str | None = None,
                max_concurrent: int = 64, served_model_name: str = "claude-echo",
                log_dir: str | os.PathLike | None = None) -> KatanServer:
    """Start llm-katan (echo backend) on a free loopback port; the caller must .stop() it."""
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="katan_"))
    options = ["--model", served_model_name, "--backend", "echo", "--providers", "anthropic",
               "--host", LOOPBACK, "--stats-file", "", "--disable-dashboard", "--log-level", "info",
               # the server-side semaphore would otherwise serialise requests (default 1)
               "--max-concurrent", str(max_concurrent),
               "--error-rate", str(error_rate), "--latency-ms", str(latency_ms),
               "--rate-limit-after", str(rate_limit_after), "--timeout-after", str(timeout_after),
               "--max-inflight", str(max_inflight)]
    if api_key is not None:
        options += ["--validate-keys", "--api-keys", f"anthropic={api_key}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("LLM_KATAN_MODEL", "LLM_KATAN_PORT", "LLM_KATAN_BACKEND", "LLM_KATAN_HOST"):
        env.pop(name, None)  # these would override our command line
    last_error: Exception | None = None
    for attempt in range(3):  # another process may grab the free port before llm-katan binds it
        port = free_port()
        log_path = log_dir / f"katan_{port}.log"
        command = [sys.executable, "-c", "from llm_katan.cli import main; main()", *options, "--port", str(port)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL)
        base_url = f"http://{LOOPBACK}:{port}"
        server = KatanServer(base_url=base_url, port=port, log_path=log_path, process=process)
        try:
            _wait_healthy(base_url, process, log_path)
            return server
        except RuntimeError as err:
            server.stop()
            last_error = err
    raise RuntimeError(f"could not start llm-katan: {last_error}")


@contextlib.contextmanager
def katan_server(**options):
    server = start_katan(**options)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class StubResponse:
    """One scripted answer: status, headers, JSON body; delay_s is slept before answering.
    status=None means "forward to the upstream after the delay"."""
    status: int | None = 200
    headers: dict = field(default_factory=dict)
    body: dict | None = None
    delay_s: float = 0.0


def anthropic_error_body(status: int, message: str = "scripted error") -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}


class StubServer:
    """Scripted loopback server; `.arrivals` lists (monotonic time, status sent) per answered request,
    `.received` counts requests as they arrive (before any scripted delay)."""

    def __init__(self, script: list[StubResponse], upstream: str | None = None):
        self._script = list(script)
        self._upstream = upstream.rstrip("/") if upstream else None
        self._lock = threading.Lock()
        self.arrivals: list[tuple[float, int]] = []
        self.received = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with stub._lock:
                    stub.received += 1
                    step = stub._script.pop(0) if stub._script else StubResponse(status=None)
                if step.delay_s:
                    time.sleep(step.delay_s)
                if step.status is None:
                    status, headers, payload = stub._forward(self.path, self.headers, body)
                else:
                    status, headers = step.status, dict(step.headers)
                    payload = json.dumps(step.body if step.body is not None
                                         else anthropic_error_body(step.status)).encode()
                with stub._lock:
                    stub.arrivals.append((arrived, status))
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, str(value))
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _forward(self, path, headers, body):
        if self._upstream is None:
            return 500, {}, json.dumps(anthropic_error_body(500, "stub has no upstream")).encode()
        keep = {k: v for k, v in headers.items() if k.lower() in ("x-api-key", "anthropic-version", "content-type")}
        request = urllib.request.Request(self._upstream + path, data=body, headers=keep, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, {}, response.read()
        except urllib.error.HTTPError as err:
            return err.code, {}, err.read()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_stub(script: list[StubResponse], upstream: str | None = None) -> StubServer:
    return StubServer(script, upstream)


@pytest.fixture
def katan_factory(tmp_path_factory):
    """Call `katan_factory(**failure_options)` -> KatanServer; all are stopped after the test."""
    servers: list[KatanServer] = []

    def make(**options) -> KatanServer:
        options.setdefault("log_dir", tmp_path_factory.mktemp("katan"))
        server = start_katan(**options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def stub_factory():
    """Call `stub_factory(script, upstream=None)` -> StubServer; all are stopped after the test."""
    stubs: list[StubServer] = []

    def make(script: list[StubResponse], upstream: str | None = None) -> StubServer:
        stub = start_stub(script, upstream)
        stubs.append(stub)
        return stub

    yield make
    for stub in stubs:
        stub.stop()


@pytest.fixture(scope="module")
def katan_echo(tmp_path_factory):
    """One plain llm-katan echo server (no failures) shared by a test module."""
    server = start_katan(log_dir=tmp_path_factory.mktemp("katan_echo"))
    yield server
    server.stop()
