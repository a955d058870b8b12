"""docs/first_hour.md runs as written: every command of the page, from the repository root, with the
interpreter `make install` creates (.venv/bin/python).

Each command is a ```bash (or ```python) block followed by a comment
`<!-- first-hour: id=NAME; [slow;] [after=ID;] expect=TEXT -->`: the command must exit 0 and print
TEXT (stdout or stderr); `after` runs that command first (once per session); `slow` marks the commands
that run SmolLM2-135M-Instruct (minutes on a busy 2-core machine; the tiny model's take seconds when idle).
The only change to a command is where it writes: /tmp/sdpo-first-hour becomes a temporary folder, so runs never
meet; the models converted for them (SmolLM2 from its GGUF file, ~40 s of CPU) go to the cache a user's commands
would use (CACHE_DIR, else BASE_WORK's, else /tmp/sdpo_cache, as this session sees it): converted once per machine,
as for a user, not once per session. The commands run in the background from the session's first test on, two at a
time, once per session even under pytest-xdist (conftest.first_hour_runs); their tests come last.
FIRST_HOUR_TIMINGS=FILE appends each command's wall time and the load average (JSON lines), which is how the
page's times were measured (this file alone).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from auxiliary.runtime.model_loading import default_cache_dir

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "first_hour.md"
PYTHON = REPO / ".venv" / "bin" / "python"
OUT = "/tmp/sdpo-first-hour"
_BLOCK = re.compile(r"```(bash|python)\n(.*?)```\n<!-- first-hour: (.*?) -->", re.S)


def page_commands() -> dict[str, dict]:
    commands = {}
    for language, body, spec in _BLOCK.findall(PAGE.read_text()):
        fields = dict(part.strip().split("=", 1) if "=" in part else (part.strip(), True)
                      for part in spec.split(";") if part.strip())
        commands[fields["id"]] = {"language": language, "body": body, "slow": bool(fields.get("slow")),
                                  "after": fields.get("after"), "expect": fields["expect"]}
    return commands


COMMANDS = page_commands()
USER_CACHE = default_cache_dir()  # the model cache of the one running the suite (before BASE_WORK is set for a command)
# Lines of libraries that tell a new user nothing about their run (issue #29): none may print.
LIBRARY_NOISE = ("Setting accelerator to CPU", "pkg_resources is deprecated", "fatal: not a git repository")
QUOTED_METRICS = re.compile(r"'(loss|grad_norm|learning_rate)': '")  # transformers' log dict of strings


def test_every_command_block_of_the_page_is_tested():
    blocks = re.findall(r"```(?:bash|python)\n", PAGE.read_text())
    assert len(blocks) == len(COMMANDS) >= 10
    assert "TIME_" not in PAGE.read_text() and "TIMING_LOAD" not in PAGE.read_text(), "a time is missing"


def test_the_commands_marked_slow_are_those_on_the_135m_model_as_the_page_says():
    slow = {name for name, command in COMMANDS.items() if command["slow"]}
    assert slow == {name for name, command in COMMANDS.items()
                    if "smollm2-135m-instruct" in command["body"] and "--dry-run" not in command["body"]}
    assert "those that run SmolLM2-135M-Instruct are marked slow" in PAGE.read_text()


def test_the_readme_links_the_page_at_the_top_and_shares_its_python_snippet():
    readme = (REPO / "README.md").read_text()
    assert "docs/first_hour.md" in "\n".join(readme.splitlines()[:12])
    assert COMMANDS["python"]["body"] in readme


def test_short_offline_runs_in_the_readme_and_the_page_start_learning_at_step_1():
    """The offline trainers warm up over --warmup_ratio 0.05 of the steps, rounded up to a whole step whose learning
    rate is 0: a documented run of a few steps says --warmup_ratio 0 (and the page's test checks step 1's rate)."""
    texts = {"README.md": (REPO / "README.md").read_text(), "docs/first_hour.md": PAGE.read_text()}
    short = [(where, line) for where, text in texts.items() for line in text.replace("\\\n", " ").splitlines()
             if re.search(r"train_offline_s\w+\.sh.*--max_steps [1-9]\b", line)]
    assert len(short) >= 5, short  # README: SDPO and SFT; the page: SDPO, SFT, LoRA
    assert [item for item in short if "--warmup_ratio 0 " not in item[1] + " "] == []


def test_the_documented_cpu_chat_commands_are_short_and_say_how_long_they_take():
    """The chat's default of 256 new tokens took 43 s a reply on the 135M model, rambling to the limit (issue #29):
    the README's and docs/chat.md's CPU commands cap the reply at 64 tokens and say what that takes."""
    for page in ("README.md", "docs/chat.md"):
        text = (REPO / page).read_text()
        commands = [line for line in text.splitlines()
                    if re.search(r"chat_sdpo\.py --model smollm2-135m-instruct", line) and not line.startswith("|")]
        assert commands, page
        for line in commands:
            limit = re.search(r"--max_new_tokens (\d+)", line)
            assert limit and int(limit.group(1)) <= 64, (page, line)
        flat = text.replace("\n# ", " ").replace("\n", " ")
        assert re.search(r"about 14 s (a reply|\(up to 64 tokens\))", flat), page


@contextlib.contextmanager
def started(names: list[str], root: Path, drop_queued_at_exit: bool = True):
    """Run the commands of `names` and those they come after, two at a time, each a child process on one torch
    thread; each leaves its result in `root` (finished reads it). In page order: a command is queued after the one
    it comes after, so no worker waits on one still queued. conftest.first_hour_runs starts them at the session's
    first test, so that they run beside the rest of the suite."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = set()
    for name in names:
        while name and name not in wanted:
            wanted.add(name)
            name = COMMANDS[name]["after"]
    (root / "runner.pid").write_text(str(os.getpid()))
    futures, pool = {}, ThreadPoolExecutor(max_workers=2)
    try:
        for name in (n for n in COMMANDS if n in wanted):
            futures[name] = pool.submit(run_command, name, root, futures.get(COMMANDS[name]["after"]))
            futures[name].add_done_callback(functools.partial(_record, root / f"{name}.result.json"))
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=drop_queued_at_exit)


def _record(path: Path, future) -> None:
    if future.cancelled():
        outcome = {"error": "not run: the session stopped first"}
    elif future.exception() is not None:
        outcome = {"error": f"{type(future.exception()).__name__}: {future.exception()}"}
    else:
        result = future.result()
        outcome = {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
    path.with_suffix(".tmp").write_text(json.dumps(outcome))
    os.replace(path.with_suffix(".tmp"), path)  # whole or absent for a reader in another process


def finished(root: Path, name: str) -> subprocess.CompletedProcess:
    """The result `started` left for `name`, waited for (in whichever process started the commands)."""
    path = root / f"{name}.result.json"
    while not path.exists():
        runner = root / "runner.pid"
        if runner.exists() and not _alive(int(runner.read_text())) and not path.exists():
            pytest.fail(f"the process running docs/first_hour.md's commands ended before {name} finished")
        time.sleep(1)
    outcome = json.loads(path.read_text())
    if "error" in outcome:
        pytest.fail(f"{name}: {outcome['error']}")
    return subprocess.CompletedProcess(name, outcome["returncode"], outcome["stdout"], outcome["stderr"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_command(name: str, root: Path, after=None) -> subprocess.CompletedProcess:
    if after is not None:
        assert after.result().returncode == 0, f"{COMMANDS[name]['after']}, which {name} comes after, failed"
    command = COMMANDS[name]
    body = command["body"].replace(OUT, str(root))
    env = {k: v for k, v in os.environ.items() if not re.search(r"(_KEY|_TOKEN|_SECRET|PASSWORD)$", k)}
    env.update(HF_HUB_OFFLINE="1", SDPO_ENV_FILE="", BASE_WORK=str(root), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true", CACHE_DIR=str(USER_CACHE))
    env.pop("PYTHONPATH", None)  # the page's commands must find the modules on their own
    if command["language"] == "python":
        script = root / f"{name}.py"
        script.write_text(body)
        argv = [str(PYTHON), str(script)]
    else:
        argv = ["bash", "-c", "set -eo pipefail\n" + body]
    begun = time.time()
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.time() - begun
    if os.environ.get("FIRST_HOUR_TIMINGS"):
        with open(os.environ["FIRST_HOUR_TIMINGS"], "a") as f:
            f.write(json.dumps({"id": name, "seconds": round(elapsed, 1), "load": os.getloadavg()[0]}) + "\n")
    return result


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c["slow"] else n
                                  for n, c in COMMANDS.items()])
def test_the_command_runs_as_written(name, first_hour_runs):
    if first_hour_runs is None:
        pytest.skip(".venv/bin/python missing: the page starts after `make install`")
    root = first_hour_runs
    result = finished(root, name)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-3000:]
    assert COMMANDS[name]["expect"] in printed, printed[-3000:]
    assert "Traceback" not in printed, printed[-3000:]
    assert [noise for noise in LIBRARY_NOISE if noise in printed] == [], printed[-3000:]
    assert not QUOTED_METRICS.search(printed), printed[-3000:]
    if name == "tiny":  # the README's fastest path (the same run) names every file it writes
        readme = (REPO / "README.md").read_text()
        fastest_path = readme[readme.index("## Fastest path"):readme.index("## The two commands")]
        written = sorted(p.name for p in (root / "tiny").iterdir() if not p.name.startswith("."))
        assert [f for f in written if f"`{f}`" not in fastest_path] == []
    trained = re.search(r"OUTPUT_DIR=/tmp/sdpo-first-hour/(\S+) .*train_offline_", COMMANDS[name]["body"], re.S)
    if trained:  # a short offline run learns from step 1: no warmup step at learning rate 0 (issue #29)
        rows = [json.loads(line) for line in (root / trained.group(1) / "metrics.jsonl").read_text().splitlines()]
        first = next(row for row in rows if row.get("step") == 1 and "learning_rate" in row)
        assert first["learning_rate"] > 0, first
    if name == "wandb":
        runs = list((root / "wandb" / "wandb").glob("offline-run-*"))
        assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
