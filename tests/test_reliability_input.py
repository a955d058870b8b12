"""Bad input through the command line: what a user at a terminal sees from eval_online_sdpo.py and the offline trainer.

Each failure must end with one clear line on stderr naming the file, line or field (no traceback) and a
non-zero exit; a prompt that is merely too long is dropped and counted, and train_n / eval_n larger than
the data are clamped with a warning. The online failures run in process as a child would see them
(reliability_helpers.run_like_a_child: the script is sys.exit(main())), and so do the offline cases, whose exit
codes come from the trainer's __main__ block (reliability_helpers.main_block runs that block); the good run is a
child process. test_eval_online.py and test_offline_training.py check the messages too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reliability_helpers import (ERROR_PREFIX, REPO, clean_env, copy_without_chat_template, last_line, online_args,
                                 main_block, read_json, read_jsonl, run_cli, run_like_a_child,
                                 write_prompts)

OFFLINE_SCRIPT = REPO / "offline_sdpo" / "main_offline_sdpo.py"
OFFLINE_FIXTURE = REPO / "tests" / "fixtures" / "offline" / "interactions.jsonl"
SHORT = ["Say hello.", "Name a colour.", "Count to three."]
LONG = "Please read all of this carefully. " * 60  # far over --max_prompt_tokens 96


def online_cases(model_dir: Path, data: Path) -> dict:
    """name -> (argv, extra environment, expected text in the last stderr line)."""
    def case(name, expected, **overrides):
        return name, (online_args(model_dir, data, data / "out" / name, **overrides), {}, expected)

    cases = dict([
        case("malformed_jsonl", f"{data / 'malformed.jsonl'}:2: malformed JSON", train_jsonl=data / "malformed.jsonl"),
        case("missing_field", f"{data / 'missing.jsonl'}:3: missing field 'prompt'",
             train_jsonl=data / "missing.jsonl"),
        case("empty_prompt", f"{data / 'empty.jsonl'}:2: field 'prompt' is empty", val_jsonl=data / "empty.jsonl"),
        case("all_prompts_too_long", "all 2 prompts are longer than --max_prompt_tokens 96",
             train_jsonl=data / "long.jsonl"),
        case("unknown_style", "no_emojis", style="no_emojiz"),  # the known styles are listed
        case("missing_model", "does not exist", model=data / "no_such_model"),
        case("no_chat_template", "chat template", model=data / "no_template"),
        case("output_dir_not_writable", "not writable", output_dir=data / "a_file" / "run"),
        case("claude_without_api_key", "ANTHROPIC_API_KEY", user_simulator="claude"),
    ])
    return cases


def offline_cases(model_dir: Path, data: Path) -> dict:
    def args(train_jsonl, model=model_dir):  # an output folder each: the cases run at once, and a folder has one writer
        return ["--base_model", model, "--train_jsonl", train_jsonl, "--output_dir",
                data / f"offline_out_{Path(train_jsonl).stem}", "--max_steps", "1"]

    return {
        "offline_malformed_jsonl": (args(data / "offline_malformed.jsonl"), {},
                                    f"{data / 'offline_malformed.jsonl'}:2: malformed JSON"),
        "offline_missing_field": (args(data / "offline_missing.jsonl"), {},
                                  f"{data / 'offline_missing.jsonl'}:1: missing field(s) user_response"),
    }


def write_inputs(data: Path, model_dir: Path) -> None:
    write_prompts(data / "train.jsonl", SHORT + [LONG])  # 3 usable, 1 dropped and counted
    write_prompts(data / "validation.jsonl", SHORT)
    (data / "malformed.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "cut off\n{"prompt": "fine too"}\n')
    (data / "missing.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"text": "no prompt field"}\n')
    (data / "empty.jsonl").write_text('{"prompt": "a"}\n{"prompt": "   "}\n')
    write_prompts(data / "long.jsonl", [LONG, LONG + "again"])
    (data / "a_file").write_text("a file where a folder should be")
    copy_without_chat_template(model_dir, data / "no_template")
    good = OFFLINE_FIXTURE.read_text().splitlines()
    (data / "offline_malformed.jsonl").write_text(good[0] + "\n{not json\n")
    record = json.loads(good[0])
    record.pop("user_response")
    (data / "offline_missing.jsonl").write_text(json.dumps(record) + "\n" + good[1] + "\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """The cases' folder: every bad input file, and a copy of the tiny model without a chat template."""
    data = tmp_path_factory.mktemp("bad_input")
    write_inputs(data, Path(tiny_model_dir))
    return data


@pytest.fixture(scope="module")
def results(inputs, tiny_model_dir):
    """One good online run with clamping and a dropped prompt, a child process: its warnings are log lines a
    terminal shows."""
    data = inputs
    good_out = data / "out" / "clamped"
    argv = online_args(tiny_model_dir, data, good_out, train_n=50, eval_n=50, eval_every=0)
    return {"clamped_and_dropped": (run_cli(argv, clean_env(), timeout=300), None)}, good_out


ONLINE_FAILURES = ["malformed_jsonl", "missing_field", "empty_prompt", "all_prompts_too_long", "unknown_style",
                   "missing_model", "no_chat_template", "output_dir_not_writable", "claude_without_api_key"]


@pytest.mark.parametrize("case", ONLINE_FAILURES)
def test_online_bad_input_ends_with_one_clear_line(inputs, tiny_model_dir, case, monkeypatch, capfd):
    import eval_online_sdpo

    argv, extra_env, expected = online_cases(tiny_model_dir, inputs)[case]
    result = run_like_a_child(eval_online_sdpo.main, argv, monkeypatch, capfd, **extra_env)
    assert result.returncode == 2, result.stderr[-2000:]
    line = last_line(result.stderr)
    assert line.startswith(ERROR_PREFIX) and expected in line, result.stderr[-2000:]
    assert sum(1 for text in result.stderr.splitlines() if text.startswith(ERROR_PREFIX)) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["offline_malformed_jsonl", "offline_missing_field"])
def test_offline_bad_input_ends_with_one_clear_line(inputs, tiny_model_dir, case, monkeypatch, capfd):
    argv, extra_env, expected = offline_cases(tiny_model_dir, inputs)[case]
    # the trainer's __main__ block gives the exit code: run it in process as a child would see it
    result = run_like_a_child(main_block(OFFLINE_SCRIPT), argv, monkeypatch, capfd, **extra_env)
    assert result.returncode == 2, result.stderr[-2000:]
    line = last_line(result.stderr)
    assert line.startswith("error:") and expected in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_long_prompts_are_dropped_and_counted_and_n_is_clamped_with_a_warning(results):
    result, _ = results[0]["clamped_and_dropped"]
    out = results[1]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--train_n 50 is more than the usable data: clamped to 3" in result.stderr
    assert "--eval_n 50 is more than the usable data: clamped to 3" in result.stderr
    assert "dropped prompts over max_prompt_tokens=96: 1 train, 0 eval" in result.stderr
    resolved = read_json(out / "config.json")["resolved"]
    assert (resolved["train_prompts"], resolved["eval_prompts"]) == (3, 3)
    assert resolved["dropped_train_over_max_prompt_tokens"] == 1
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert all(r["n"] == 3 for r in read_json(out / "eval_history.json"))
