"""Shared preprocessing logic: message formats, pairing, history truncation, filters,
dedup, input formats, --help without side effects."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from auxiliary.runtime.io_utils import DataError
from auxiliary.data.preprocess_common import (
    InteractionBuilder, InteractionFilters, Summary, all_rows, load_splits,
    merge_consecutive_roles, normalize_message, truncate_history,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "preprocess"
SCRIPTS = ["preprocess_helpsteer", "preprocess_tldr_dataset", "preprocess_wildfeedback",
           "preprocess_wildchat", "preprocess_chat_logs"]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def build(messages, **limits):
    summary = Summary("test")
    builder = InteractionBuilder(InteractionFilters(**limits), summary)
    return builder.from_messages(messages, "conv"), summary, builder


# ----------------------------------------------------------------- messages
def test_normalize_message_accepts_both_formats():
    assert normalize_message({"role": "user", "content": "hi"}, "x") == u("hi")
    assert normalize_message({"from": "human", "value": "hi"}, "x") == u("hi")
    assert normalize_message({"from": "gpt", "value": "yo"}, "x") == a("yo")
    assert normalize_message({"role": "Assistant", "content": None}, "x") == a("")
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "here"}]
    assert normalize_message({"role": "user", "content": parts}, "x") == u("look\nhere")


def test_normalize_message_errors_name_the_location():
    with pytest.raises(DataError, match=r"f.jsonl:4 message 2: message has no 'role'"):
        normalize_message({"content": "hi"}, "f.jsonl:4 message 2")
    with pytest.raises(DataError, match=r"f.jsonl:4 message 0: a message must be an object"):
        normalize_message("hi", "f.jsonl:4 message 0")
    with pytest.raises(DataError, match="content must be a string"):
        normalize_message({"role": "user", "content": 3}, "x")


def test_merge_consecutive_roles_joins_and_alternates():
    merged = merge_consecutive_roles([u("a"), u("b"), a("c"), a(""), u("d")])
    assert merged == [u("a\n\nb"), a("c"), u("d")]


# ----------------------------------------------------------------- truncation and pairing
def test_truncate_history_keeps_last_five_starting_with_user():
    history = [u("u0"), a("a0"), u("u1"), a("a1"), u("u2"), a("a2"), u("u3")]
    assert [m["content"] for m in truncate_history(history, 5)] == ["u1", "a1", "u2", "a2", "u3"]
    # an even limit would start with an assistant message: that one is dropped
    assert [m["content"] for m in truncate_history(history, 4)] == ["u2", "a2", "u3"]
    assert truncate_history([a("hello"), u("q")], 5) == [u("q")]
    assert truncate_history(history, 0) == []


def test_each_reply_is_paired_with_the_next_user_message():
    conv = [u("q1"), a("r1"), u("f1"), a("r2"), u("f2"), a("r3 (never answered)")]
    records, summary, _ = build(conv)
    assert [(r["completion"], r["user_response"]) for r in records] == [("r1", "f1"), ("r2", "f2")]
    assert [r["assistant_turn"] for r in records] == [1, 3]
    assert [r["id"] for r in records] == ["conv:1", "conv:3"]
    assert records[1]["prompt"] == [u("q1"), a("r1"), u("f1")]
    assert records[1]["prompt_messages"] == 3
    assert records[1]["prompt_chars"] == len("q1") + len("r1") + len("f1")
    assert records[1]["completion_chars"] == 2 and records[1]["user_response_chars"] == 2
    assert not summary.dropped


def test_long_conversation_prompts_are_truncated_alternating_and_start_with_user():
    conv = []
    for k in range(6):
        conv += [u(f"u{k}"), a(f"a{k}")]
    conv.append(u("last"))
    records, _, _ = build(conv)
    assert len(records) == 6
    for r in records:
        roles = [m["role"] for m in r["prompt"]]
        assert roles[0] == "user" and roles[-1] == "user" and len(roles) <= 5
        assert all(x != y for x, y in zip(roles, roles[1:]))
    assert [m["content"] for m in records[-1]["prompt"]] == ["u3", "a3", "u4", "a4", "u5"]
    assert records[-1]["completion"] == "a5" and records[-1]["user_response"] == "last"


def test_system_messages_are_left_out_and_double_user_turns_merged():
    conv = [{"role": "system", "content": "be nice"}, u("part 1"), u("part 2"), a("reply"), u("ok")]
    records, _, _ = build(conv)
    assert records[0]["prompt"] == [u("part 1\n\npart 2")]


# ----------------------------------------------------------------- every filter
@pytest.mark.parametrize("conv, limits, reason, level", [
    ([u("q"), a(""), u("hello?")], {}, "empty_completion", "interaction"),
    ([u("q"), a("r"), u("  \n")], {}, "empty_user_response", "interaction"),
    ([u(""), a("r"), u("f")], {}, "empty_prompt", "interaction"),
    ([a("welcome"), u("f")], {}, "no_user_message_before_reply", "interaction"),
    ([u("q" * 11), a("r"), u("f")], {"max_prompt_chars": 10}, "prompt_too_long", "interaction"),
    ([u("q"), a("r" * 11), u("f")], {"max_completion_chars": 10}, "completion_too_long", "interaction"),
    ([u("q"), a("r"), u("f" * 11)], {"max_user_response_chars": 10}, "user_response_too_long", "interaction"),
    ([u("q" * 5), a("r" * 5), u("f")], {"max_conversation_chars": 10}, "conversation_too_long", "conversation"),
    ([u("q"), {"role": "tool", "content": "{}"}, a("r"), u("f")], {}, "unsupported_role", "conversation"),
    ([u("q"), a("r")], {}, "no_reply_with_follow_up", "conversation"),
])
def test_each_filter_drops_and_counts(conv, limits, reason, level):
    records, summary, _ = build(conv, **limits)
    assert records == []
    assert summary.dropped == {reason: 1}
    assert summary.levels[reason] == level
    assert f"{reason} ({level}s): 1" in summary.render()


def test_limits_are_inclusive():
    records, summary, _ = build([u("q" * 10), a("r" * 10), u("f" * 10)], max_prompt_chars=10,
                                max_completion_chars=10, max_user_response_chars=10, max_conversation_chars=30)
    assert len(records) == 1 and not summary.dropped


def test_duplicates_are_dropped_across_conversations():
    summary = Summary("t")
    builder = InteractionBuilder(InteractionFilters(), summary)
    first = builder.from_messages([u("q"), a("r"), u("f")], "c1")
    again = builder.from_messages([u("q"), a("r"), u("f"), a("r2"), u("f2")], "c2")
    assert len(first) == 1 and [r["id"] for r in again] == ["c2:3"]
    assert summary.dropped == {"duplicate": 1}
    # same reply to a different history is not a duplicate
    other = builder.from_messages([u("q other"), a("r"), u("f")], "c3")
    assert len(other) == 1


# ----------------------------------------------------------------- input formats
def test_jsonl_json_parquet_and_save_to_disk_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": "x", "messages": [u("q"), a("r"), u("f")]}, {"id": "y", "messages": [u("q2"), a("r2"), u("f2")]}]
    (tmp_path / "logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "logs.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "logs.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved"))
    for name in ["logs.jsonl", "logs.json", "logs.parquet", "saved"]:
        splits = load_splits(str(tmp_path / name))
        assert list(splits) == ["train"], name
        assert [dict(r) for _, r in splits["train"]] == records, name


def test_folder_split_names_and_locations():
    splits = load_splits(str(FIXTURES / "helpsteer2"))
    assert sorted(splits) == ["train", "validation"]
    assert len(splits["train"]) == 9 and len(splits["validation"]) == 4
    assert splits["validation"].location(2).endswith("helpsteer2/validation.jsonl:3")
    rows = all_rows(splits)
    assert len(rows) == 13
    assert rows.location(9).endswith("validation.jsonl:1")
    assert rows.fallback_id(9) == "validation.jsonl:line1"


def test_missing_local_path_and_malformed_json_array(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "arr.json"
    bad.write_text('[\n {"messages": []},\n {"messages": [}\n]')
    with pytest.raises(DataError, match=r"arr.json:3: malformed JSON"):
        load_splits(str(bad))


def test_hub_name_without_network_fails_with_a_hint(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, str(REPO / "auxiliary" / "preprocess_wildchat.py"),
                             "--out_dir", str(tmp_path / "out")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "could not load 'allenai/WildChat'" in result.stderr and "pass a local file" in result.stderr
    assert "WILDCHAT_SOURCE" in result.stderr  # the wrapper's way to pass one (scripts/prepare_data.sh)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_writes_nothing_and_imports_nothing_heavy(script, tmp_path):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(REPO / 'auxiliary' / (script + '.py'))!r}, '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exit:\n    assert exit.code in (0, None)\n"
        "print('HEAVY', sorted(m for m in ('datasets', 'torch', 'pyarrow', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--out" in result.stdout
    assert "HEAVY []" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_hidden_folders_of_a_download_are_ignored(tmp_path):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "train.jsonl").write_text('{"prompt": "stale copy"}\n')
    (tmp_path / "train.jsonl").write_text('{"prompt": "real"}\n')
    splits = load_splits(str(tmp_path))
    assert [r for _, r in splits["train"]] == [{"prompt": "real"}]
