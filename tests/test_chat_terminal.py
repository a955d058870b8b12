"""The terminal chat driven through a pseudo-terminal (pexpect) on a tiny model: three turns,
two updates, /undo restores the exact previous weights and optimizer state, /save writes
the adapter, and a second start with the same user loads it."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "you> "
TIMEOUT = 120  # seconds per expected line: generous, the test machine is shared


def start_chat(model_dir, adapters_dir, user="alice"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1", TERM="dumb", TOKENIZERS_PARALLELISM="false")
    args = [str(ROOT / "chat_sdpo.py"), "--model", model_dir, "--adapters_dir", str(adapters_dir), "--user_id", user,
            "--max_new_tokens", "6", "--temperature", "0", "--lora_r", "4", "--lora_alpha", "8", "--lr", "1e-2"]
    child = pexpect.spawn(sys.executable, args, cwd=str(ROOT), env=env, encoding="utf-8", timeout=TIMEOUT,
                          dimensions=(50, 200))
    return child


def say(child, text):
    child.expect_exact(PROMPT)
    child.sendline(text)


def snapshot(adapter: Path, into: Path) -> Path:
    shutil.copytree(adapter, into)
    return into


def saved_state(folder: Path) -> dict:
    tensors = dict(load_file(str(folder / "model" / "adapter_model.safetensors")))
    optimizer = torch.load(folder / "optimizer.pt", weights_only=False)
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = value
    return tensors


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # starts the chat as a subprocess twice: 35-100 s on 2 busy cores
def test_terminal_chat_updates_undo_save_and_reload(tmp_path, tiny_model_dir):
    adapters = tmp_path / "adapters"
    adapter = adapters / "alice" / "adapter"
    child = start_chat(tiny_model_dir, adapters)
    child.expect_exact("new user: fresh adapter")

    say(child, "Hello, how are you today?")           # turn 1: no follow-up yet, no update
    child.expect_exact("bot> ")
    say(child, "Too long, be concise.")               # turn 2: the follow-up of reply 1
    child.expect(r"\[update 1: loss [-0-9.e]+, signal mean")
    say(child, "/save")
    child.expect_exact(f"saved to {adapter}")
    after_one = saved_state(snapshot(adapter, tmp_path / "after_one"))

    say(child, "Use a formal tone.")                  # turn 3: the follow-up of reply 2
    child.expect(r"\[update 2: loss")
    say(child, "/save")
    child.expect_exact(f"saved to {adapter}")
    after_two = saved_state(snapshot(adapter, tmp_path / "after_two"))
    assert not same(after_one, after_two)

    say(child, "/undo")
    child.expect_exact("undone: update 2")
    say(child, "/why")
    child.expect_exact("follow-up: 'Use a formal tone.'")
    child.expect_exact("less likely now:")
    say(child, "/quit")                               # saves on exit
    child.expect_exact(f"saved to {adapter}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert same(after_one, saved_state(adapter))      # exactly the weights and Adam state after update 1

    log = (adapters / "alice" / "interactions.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"user_response": "Too long, be concise."' in log[0]

    child = start_chat(tiny_model_dir, adapters)      # same user again: the adapter is loaded
    child.expect_exact("loaded adapter of user 'alice'")
    child.expect_exact("(1 updates so far)")
    say(child, "/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert same(after_one, saved_state(adapter))      # loaded and saved back unchanged

