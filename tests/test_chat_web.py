"""The web chat (Gradio) in headless Chromium on a tiny model: two messages, two replies,
one update reported, /why highlighted, a screenshot, /quit saves the adapter; with --auth, two
logins in two browsers each get their own conversation and adapter.

Needs the Debian packages `chromium` and `chromium-driver` (/usr/bin/chromium and
/usr/bin/chromedriver); skipped with that reason when they are missing.
"""
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("headless browser test: needs Debian packages chromium and chromium-driver "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)
pexpect = pytest.importorskip("pexpect")
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAIT = 90  # seconds: the test machine is shared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_from_a_terminal() -> None:
    """Ctrl-C reaches the server as it does from a user's terminal: an ignored or blocked SIGINT survives exec,
    and the test process may have either (a background job of a script ignores it; a library may block it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(tmp_path, tiny_model_dir, *extra):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false")
    args = [str(ROOT / "chat_sdpo.py"), "--ui", "web", "--port", str(port), "--model", tiny_model_dir,
            "--adapters_dir", str(tmp_path / "adapters"), "--user_id", "webuser", "--max_new_tokens", "6",
            "--temperature", "0", "--lora_r", "4", "--lora_alpha", "8", *extra]
    child = pexpect.spawn(sys.executable, args, cwd=str(ROOT), env=env, encoding="utf-8", timeout=WAIT,
                          preexec_fn=as_from_a_terminal)
    child.expect_exact(f"web UI on http://127.0.0.1:{port}")
    return child, f"http://127.0.0.1:{port}/"


@pytest.fixture()
def server(tmp_path, tiny_model_dir):
    child, url = start_server(tmp_path, tiny_model_dir)
    yield child, url, tmp_path / "adapters" / "webuser" / "adapter"
    if child.isalive():
        child.terminate(force=True)


def new_browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture()
def browser():
    driver = new_browser()
    yield driver
    driver.quit()


def bot_rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#chat .message-row.bot-row")


def chat_idle(driver) -> bool:
    """Gradio hides an output's status tracker once the event writing to it has finished."""
    return bool(driver.find_elements(By.CSS_SELECTOR, "#chat > [data-testid=status-tracker].hide"))


def send(driver, text, replies_expected):
    box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    box.send_keys(text, Keys.ENTER)
    WebDriverWait(driver, WAIT).until(lambda d: len(bot_rows(d)) >= replies_expected and chat_idle(d))


@pytest.mark.slow  # a chat server subprocess and a browser: 25-60 s on 2 busy cores
def test_web_chat_two_messages_one_update_why_and_screenshot(server, browser, tmp_path):
    child, url, adapter = server
    browser.get(url)
    # the status leaves "connecting ..." when the page's load event has run: events are wired by then
    WebDriverWait(browser, WAIT).until(lambda d: "updates" in d.find_element(By.CSS_SELECTOR, "#status").text)
    send(browser, "Hello, how are you today?", 1)
    send(browser, "Too long, be concise.", 2)
    status = browser.find_element(By.CSS_SELECTOR, "#status")
    WebDriverWait(browser, WAIT).until(lambda d: "[update 1: loss" in status.text)  # polled by a gr.Timer
    assert "applied 1, skipped 0" in status.text
    chat_text = browser.find_element(By.CSS_SELECTOR, "#chat").text
    assert "Hello, how are you today?" in chat_text and "Too long, be concise." in chat_text
    assert len(bot_rows(browser)) == 2

    browser.find_element(By.CSS_SELECTOR, "#cmd-why").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#why .score-token"))
    assert "follow-up: Too long, be concise." in browser.find_element(By.CSS_SELECTOR, "#why-note").text
    shot = tmp_path / "chat_web.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"

    browser.find_element(By.CSS_SELECTOR, "#cmd-quit").click()  # saves the adapter and stops the server
    child.expect_exact(f"saved to {adapter}")
    child.expect(pexpect.EOF)
    assert (adapter / "model" / "adapter_model.safetensors").exists()


def log_in(driver, url, user, password):
    driver.get(url)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"))
    name_box = driver.find_elements(By.CSS_SELECTOR, "input[type=text], textarea")[0]
    name_box.send_keys(user)
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(password, Keys.ENTER)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#status")
                                      and "updates" in d.find_element(By.CSS_SELECTOR, "#status").text)


@pytest.mark.slow  # a chat server subprocess and two browsers: 40-90 s on 2 busy cores
def test_two_logins_have_their_own_conversations_and_adapters(tmp_path, tiny_model_dir):
    child, url = start_server(tmp_path, tiny_model_dir, "--auth", "alice:pa", "--auth", "bob:pb")
    alice, bob = new_browser(), new_browser()
    try:
        log_in(alice, url, "alice", "pa")
        send(alice, "Hello, how are you today?", 1)
        send(alice, "Too long, be concise.", 2)
        WebDriverWait(alice, WAIT).until(lambda d: "[update 1: loss" in d.find_element(By.CSS_SELECTOR, "#status").text)
        log_in(bob, url, "bob", "pb")
        assert "Hello, how are you today?" not in bob.find_element(By.CSS_SELECTOR, "#chat").text
        assert "applied 0" in bob.find_element(By.CSS_SELECTOR, "#status").text
        bob.find_element(By.CSS_SELECTOR, "#cmd-reset").click()
        WebDriverWait(bob,
                      WAIT).until(lambda d: "back to the base model" in d.find_element(By.CSS_SELECTOR, "#status").text)
        alice.find_element(By.CSS_SELECTOR, "#cmd-quit").click()  # ends (and saves) alice's session only
        WebDriverWait(alice,
                      WAIT).until(lambda d: "your session ended" in d.find_element(By.CSS_SELECTOR, "#status").text)
    finally:
        alice.quit()
        bob.quit()
    assert child.isalive()  # one user cannot stop the server for the others
    child.sendintr()  # Ctrl-C: saves bob's open session
    child.expect(pexpect.EOF)
    from online_sdpo_updater import verify_checkpoint

    from safetensors.torch import load_file

    weights = {}
    for user, updates in (("alice", 1), ("bob", 0)):
        adapter = tmp_path / "adapters" / user / "adapter"
        verify_checkpoint(adapter)
        assert json.loads((adapter / "updater_state.json").read_text())["extra"]["updates_applied"] == updates
        weights[user] = load_file(str(adapter / "model" / "adapter_model.safetensors"))
    # bob's /reset left alice's learned adapter alone: hers still differs from bob's fresh one
    assert any(not torch.equal(weights["alice"][k], weights["bob"][k]) for k in weights["alice"])
