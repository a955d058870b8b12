"""WildFeedback, WildChat and chat-log preprocessors on fixture files shaped like the
real data: pairing, truncation, English-only, seeded sampling and caps, bad input,
atomic output."""
import json
import random
from pathlib import Path

import pytest

from auxiliary import preprocess_chat_logs, preprocess_wildchat, preprocess_wildfeedback
from auxiliary.runtime.io_utils import DataError, read_jsonl

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "preprocess"
RECORD_KEYS = {"id", "conversation_id", "assistant_turn", "prompt", "completion", "user_response",
               "prompt_messages", "prompt_chars", "completion_chars", "user_response_chars"}


def assert_trainer_format(records):
    """What the offline trainer reads: prompt = alternating role/content messages that
    start and end with the user, at most 5; completion and user_response non-empty strings."""
    for r in records:
        assert set(r) == RECORD_KEYS
        roles = [m["role"] for m in r["prompt"]]
        assert 1 <= len(roles) <= 5 and roles[0] == "user" and roles[-1] == "user"
        assert all(x != y for x, y in zip(roles, roles[1:]))
        assert all(set(m) == {"role", "content"} for m in r["prompt"])
        assert isinstance(r["completion"], str) and r["completion"].strip()
        assert isinstance(r["user_response"], str) and r["user_response"].strip()
        assert r["prompt_chars"] == sum(len(m["content"]) for m in r["prompt"])
        assert r["completion_chars"] == len(r["completion"])


# ----------------------------------------------------------------- WildFeedback
def test_wildfeedback_pairs_truncates_and_dedups(tmp_path):
    out = tmp_path / "wf.jsonl"
    summary = preprocess_wildfeedback.main(
        ["--dataset", str(FIXTURES / "wildfeedback" / "wildfeedback.json"), "--out", str(out)])
    records = read_jsonl(out)
    assert_trainer_format(records)
    assert [r["id"] for r in records] == ["row0:1", "row0:3", "row3:1", "row3:3", "row3:5", "row3:7"]
    assert (records[0]["completion"], records[0]["user_response"]) == (
        "Place the egg in boiling water for 9 minutes.", "That's too long, I want a soft yolk.")
    # the 9-message Rome conversation: the last reply sees only the last 5 messages
    assert [m["content"] for m in records[-1]["prompt"]] == [
        "Four days.", "Day 1: Colosseum. Day 2: Vatican. Day 3: Trastevere. Day 4: Borghese.",
        "Add a food tour.", "Added a food tour in Testaccio on day 3.", "Make it cheaper."]
    assert records[-1]["user_response"] == "Perfect, now give me a packing list."
    # item 1 repeats item 0's first exchange; item 2 is single-turn; items 4 and 5 are empty
    assert dict(summary.dropped) == {"duplicate": 1, "no_reply_with_follow_up": 1,
                                     "empty_completion": 1, "empty_user_response": 1}
    assert summary.counts["conversations read"] == 6 and summary.counts["interactions kept"] == 6


def test_wildfeedback_shorter_history_and_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preprocess_wildfeedback.main(["--dataset", str(FIXTURES / "wildfeedback" / "wildfeedback.json"),
                                  "--max_history_messages", "4"])
    records = read_jsonl(tmp_path / "data" / "wildfeedback" / "wildfeedback_interactions.jsonl")
    assert [m["content"] for m in records[-1]["prompt"]] == [
        "Add a food tour.", "Added a food tour in Testaccio on day 3.", "Make it cheaper."]


# ----------------------------------------------------------------- WildChat
WILDCHAT = FIXTURES / "wildchat"
WILDCHAT_IDS = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]
USABLE = {"c1": 1, "c2": 2, "c7": 1, "c8": 1}  # English, not toxic, with a follow-up: interactions each


def expected_conversation_order(seed):
    order = list(range(len(WILDCHAT_IDS)))
    random.Random(seed).shuffle(order)
    return [WILDCHAT_IDS[i] for i in order if WILDCHAT_IDS[i] in USABLE]


def conversation_sequence(records):
    seq = []
    for r in records:
        if not seq or seq[-1] != r["conversation_id"]:
            seq.append(r["conversation_id"])
    return seq


def run_wildchat(tmp_path, *extra, name="wc.jsonl"):
    out = tmp_path / name
    summary = preprocess_wildchat.main(["--dataset", str(WILDCHAT), "--out", str(out), *extra])
    return read_jsonl(out), summary


def test_wildchat_english_only_and_toxic_filter(tmp_path):
    records, summary = run_wildchat(tmp_path)
    assert_trainer_format(records)
    assert sorted(r["conversation_id"] for r in records) == ["c1", "c2", "c2", "c7", "c8"]
    assert dict(summary.dropped) == {"non_english": 2, "toxic": 1, "no_reply_with_follow_up": 1}
    merged = next(r for r in records if r["conversation_id"] == "c7")
    assert merged["prompt"] == [{"role": "user", "content": "I have a Python question.\n\nHow do I reverse a list?"}]
    kept_toxic, summary = run_wildchat(tmp_path, "--keep_toxic", name="toxic.jsonl")
    assert [(r["completion"], r["user_response"]) for r in kept_toxic if r["conversation_id"] == "c5"] == [
        ("I'd rather not.", "Do it anyway.")]
    assert "toxic" not in summary.dropped


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_wildchat_seeded_order_and_conversation_cap(tmp_path, seed):
    records, _ = run_wildchat(tmp_path, "--seed", str(seed))
    assert conversation_sequence(records) == expected_conversation_order(seed)
    capped, summary = run_wildchat(tmp_path, "--seed", str(seed), "--max_conversations", "2", name="capped.jsonl")
    assert conversation_sequence(capped) == expected_conversation_order(seed)[:2]
    assert len(capped) == sum(USABLE[c] for c in expected_conversation_order(seed)[:2])
    assert summary.counts["conversations used"] == 2
    assert any("cap of 2 conversations" in note for note in summary.notes)


def test_wildchat_interaction_cap_and_determinism(tmp_path):
    full, _ = run_wildchat(tmp_path, "--seed", "7", name="a.jsonl")
    capped, summary = run_wildchat(tmp_path, "--seed", "7", "--max_interactions", "3", name="b.jsonl")
    assert capped == full[:3]
    assert summary.counts["interactions kept"] == 3
    run_wildchat(tmp_path, "--seed", "7", name="c.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()


def test_wildchat_parquet_input_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(WILDCHAT / "train.jsonl")
    folder = tmp_path / "wildchat_parquet" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    from_jsonl, _ = run_wildchat(tmp_path, name="j.jsonl")
    summary = preprocess_wildchat.main(
        ["--dataset", str(tmp_path / "wildchat_parquet"), "--out", str(tmp_path / "p.jsonl")])
    assert read_jsonl(tmp_path / "p.jsonl") == from_jsonl
    assert summary.counts["interactions kept"] == 5


# ----------------------------------------------------------------- chat logs
LOGS = FIXTURES / "chat_logs"


def test_chat_logs_both_formats_system_and_content_parts(tmp_path):
    out = tmp_path / "interactions.jsonl"
    summary = preprocess_chat_logs.main(["--input", str(LOGS / "logs.jsonl"), "--out", str(out)])
    records = read_jsonl(out)
    assert_trainer_format(records)
    assert [r["id"] for r in records] == ["support-001:1", "support-002:1", "support-003:2", "line5:1"]
    # support-001: the system prompt is left out of `prompt`; support-003's content parts become text
    assert records[0]["prompt"] == [{"role": "user", "content": "My order hasn't arrived."}]
    assert records[1]["completion"] == "Yes, in Settings > Addresses before the order ships."
    assert records[2]["user_response"] == "And on weekends?"
    # support-003 opens with a greeting nobody asked for; support-004 has a tool message
    assert dict(summary.dropped) == {"no_user_message_before_reply": 1, "unsupported_role": 1}


def test_chat_logs_filters_from_the_command_line(tmp_path):
    convs = [
        [("user", "short question"), ("assistant", "x" * 30), ("user", "too long a reply")],
        [("user", "q" * 30), ("assistant", "fine"), ("user", "ok")],
        [("user", "fine question"), ("assistant", "fine answer"), ("user", "f" * 30)],
        [("user", "fine question"), ("assistant", "fine answer"), ("user", "thanks")],
    ]
    src = tmp_path / "logs.jsonl"
    src.write_text(
        "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n" for conv in convs))
    summary = preprocess_chat_logs.main(["--input", str(src), "--out", str(tmp_path / "o.jsonl"),
                                         "--max_completion_chars", "20", "--max_prompt_chars", "20",
                                         "--max_user_response_chars", "20"])
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["line4:1"]
    assert dict(summary.dropped) == {"completion_too_long": 1, "prompt_too_long": 1, "user_response_too_long": 1}


@pytest.mark.parametrize("fixture, message", [
    ("malformed.jsonl", r"malformed.jsonl:3: malformed JSON"),
    ("missing_messages.jsonl", r"missing_messages.jsonl:2: conversation record has no 'messages' field"),
])
def test_chat_logs_bad_input_names_file_and_line_and_writes_nothing(tmp_path, fixture, message):
    out = tmp_path / "out" / "interactions.jsonl"
    out.parent.mkdir()
    out.write_text("previous results\n")
    with pytest.raises(DataError, match=message):
        preprocess_chat_logs.main(["--input", str(LOGS / fixture), "--out", str(out)])
    assert out.read_text() == "previous results\n"  # untouched: no partial overwrite
    assert [p.name for p in out.parent.iterdir()] == ["interactions.jsonl"]  # no temporary leftovers


def test_bad_message_is_reported_with_line_and_index(tmp_path):
    src = tmp_path / "logs.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"text": "no role"}]}) + "\n")
    with pytest.raises(DataError, match=r"logs.jsonl:1 message 1: message has no 'role'"):
        preprocess_chat_logs.main(["--input", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tmp_path, monkeypatch, capfd):
    from reliability_helpers import main_block, run_like_a_child

    result = run_like_a_child(main_block(REPO / "auxiliary" / "preprocess_chat_logs.py"),
                              ["--input", LOGS / "malformed.jsonl", "--out", tmp_path / "o.jsonl"], monkeypatch, capfd)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {LOGS / 'malformed.jsonl'}:3: malformed JSON")
    assert not (tmp_path / "o.jsonl").exists()


def test_paper_filters_drop_long_turns_and_long_conversations_and_keep_flags_winning(tmp_path):
    import json

    long_turn = {"conversation_hash": "long_turn", "language": "English", "toxic": False, "conversation": [
        {"role": "user", "content": "Summarise this: " + "x" * 4100}, {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Shorter."}]}
    long_conversation = {"conversation_hash": "long_conv", "language": "English", "toxic": False, "conversation": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 4000} for i in range(26)]}
    ok = {"conversation_hash": "ok", "language": "English", "toxic": False, "conversation": [  # turns < 4,096
        {"role": "user", "content": "a" * 4000}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "b" * 4000}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "c" * 4000}, {"role": "assistant", "content": "Here it is."},
        {"role": "user", "content": "Too long."}]}
    data = tmp_path / "wildchat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (long_turn, long_conversation, ok)))
    out = tmp_path / "paper.jsonl"
    summary = preprocess_wildchat.main(["--dataset", str(data), "--out", str(out), "--paper_filters"])
    # the 12,012-character history of the last reply passes: the paper sets no prompt limit
    assert [r["conversation_id"] for r in read_jsonl(out)] == ["ok", "ok", "ok"]
    assert dict(summary.dropped) == {"turn_too_long": 1, "conversation_too_long": 1}
    default = preprocess_wildchat.main(["--dataset", str(data), "--out", str(tmp_path / "default.jsonl")])
    # today's filters stay the default: no turn limit, 40k per conversation, 12k of history
    assert dict(default.dropped) == {"conversation_too_long": 1, "prompt_too_long": 1}
    flag_wins = preprocess_wildchat.main(["--dataset", str(data), "--out", str(tmp_path / "flag.jsonl"),
                                          "--paper_filters", "--max_turn_chars", "0"])
    assert "turn_too_long" not in flag_wins.dropped and flag_wins.dropped["conversation_too_long"] == 1


def test_paper_filter_caps_of_wildchat_are_the_papers():
    from auxiliary.data.preprocess_common import parse_args_with_presets

    args = parse_args_with_presets(preprocess_wildchat.build_parser(), ["--paper_filters"],
                                   {**preprocess_wildchat.PAPER_FILTERS, "max_conversations": 15_000,
                                    "max_interactions": 50_000})
    assert (args.max_conversations, args.max_interactions, args.max_conversation_chars, args.max_turn_chars,
            args.max_history_messages) == (15_000, 50_000, 100_000, 4096, 5)
