"""Record the README's chat transcript (terminal, through a pseudo-terminal) and web screenshot.

    python docs/record_chat_demo.py --model smollm2-135m-instruct            # both
    python docs/record_chat_demo.py --only terminal                           # just the transcript

Writes docs/chat_transcript.txt and docs/chat_web.png. The web part needs /usr/bin/chromium
and /usr/bin/chromedriver (Debian packages chromium, chromium-driver).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
TERMINAL_SCRIPT = [
    "Write a short email to my manager asking for Friday off.",
    "Too long. Please keep it to two sentences.",
    "Thanks! Now give me three tips for better sleep.",
    "/why",
    "/undo",
    "/save",
    "/quit",
]
WEB_SCRIPT = [
    "Write a short email to my manager asking for Friday off.",
    "Too long. Please keep it to two sentences.",
]


def chat_args(model: str, adapters: str, extra: list[str]) -> list[str]:
    return [str(ROOT / "chat_sdpo.py"), "--model", model, "--adapters_dir", adapters, "--user_id", "demo",
            "--max_new_tokens", "120", *extra]


def record_terminal(model: str, out: Path) -> None:
    import pexpect

    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1", TERM="dumb")
    with tempfile.TemporaryDirectory() as adapters:
        child = pexpect.spawn(sys.executable, chat_args(model, adapters, []), cwd=str(ROOT), env=env,
                              encoding="utf-8", timeout=600, dimensions=(60, 110))
        captured = []
        child.logfile_read = _Collector(captured)
        for line in TERMINAL_SCRIPT:
            child.expect_exact("you> ")
            if line == "/why":  # let the update of the last follow-up finish, so /why shows it
                child.expect(r"\[update 2: ")
                child.expect_exact("you> ")  # the prompt redrawn under the status line
            child.sendline(line)
        child.expect(pexpect.EOF)
    text = ANSI.sub("", "".join(captured)).replace("\r\n", "\n")
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))  # a carriage return overwrites
    text = text.replace(adapters, "$ADAPTERS_DIR")
    text = "\n".join(line for line in text.splitlines() if not _noise(line)) + "\n"
    out.write_text(
        f"$ OMP_NUM_THREADS=1 python chat_sdpo.py --model {model} --adapters_dir $ADAPTERS_DIR --user_id demo "
        "--max_new_tokens 120\n" + text)
    print(f"wrote {out}")


def _noise(line: str) -> bool:
    """Progress bars and library warnings: not part of the conversation."""
    return any(k in line for k in ("Loading weights", "Writing model shards", "FutureWarning", "warnings.warn"))


class _Collector:
    def __init__(self, parts):
        self.parts = parts

    def write(self, data):
        self.parts.append(data)

    def flush(self):
        pass


def record_web(model: str, out: Path, port: int) -> None:
    import pexpect
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with tempfile.TemporaryDirectory() as adapters:
        server = pexpect.spawn(sys.executable, chat_args(model, adapters, ["--ui", "web", "--port", str(port)]),
                               cwd=str(ROOT), env=env, encoding="utf-8", timeout=600)
        server.expect_exact(f"web UI on http://127.0.0.1:{port}")
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,1250"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 600)
            wait.until(lambda d: "updates" in d.find_element(By.CSS_SELECTOR, "#status").text)
            for count, message in enumerate(WEB_SCRIPT, start=1):
                driver.find_element(By.CSS_SELECTOR, "#message textarea").send_keys(message, Keys.ENTER)
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat .message-row.bot-row")) >= count
                           and d.find_elements(By.CSS_SELECTOR, "#chat > [data-testid=status-tracker].hide"))
            wait.until(lambda d: "[update 1:" in d.find_element(By.CSS_SELECTOR, "#status").text)
            driver.find_element(By.CSS_SELECTOR, "#cmd-why").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#why .score-token"))
            time.sleep(1)
            raw = out.with_suffix(".raw.png")
            driver.save_screenshot(str(raw))
            driver.find_element(By.CSS_SELECTOR, "#cmd-quit").click()
            server.expect(pexpect.EOF)
        finally:
            driver.quit()
    _shrink_png(raw, out)
    raw.unlink()
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def _shrink_png(source: Path, target: Path) -> None:
    """A 256-colour palette keeps a UI screenshot sharp and well under 300 KB."""
    from PIL import Image

    Image.open(source).convert("RGB").quantize(colors=256).save(target, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--only", choices=("terminal", "web"), default=None)
    parser.add_argument("--port", type=int, default=7861)
    args = parser.parse_args()
    if args.only in (None, "terminal"):
        record_terminal(args.model, ROOT / "docs" / "chat_transcript.txt")
    if args.only in (None, "web"):
        record_web(args.model, ROOT / "docs" / "chat_web.png", args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
