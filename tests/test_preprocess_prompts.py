"""HelpSteer2 and TL;DR prompt preprocessors on fixture files shaped like the real data."""
import json
from pathlib import Path

import pytest

from auxiliary import preprocess_helpsteer, preprocess_tldr_dataset
from auxiliary.runtime.io_utils import DataError, read_jsonl

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "preprocess"


def prompts(path):
    return [r["prompt"] for r in read_jsonl(path)]


# ----------------------------------------------------------------- HelpSteer2
def test_helpsteer_outputs_and_every_filter(tmp_path):
    out = tmp_path / "helpsteer_prompts"
    summary = preprocess_helpsteer.main(["--dataset", str(FIXTURES / "helpsteer2"), "--out_dir", str(out),
                                         "--max_prompt_chars", "200"])
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "validation.jsonl"]
    assert prompts(out / "train.jsonl") == [
        "What is the capital of France? Answer briefly.",
        "Explain photosynthesis to a ten-year-old.",
        "List three prime numbers greater than 50.",
    ]
    assert prompts(out / "validation.jsonl") == [
        "Write a haiku about autumn leaves.",
        "Give me three tips for a job interview.",
    ]
    assert all(list(r) == ["prompt"] for r in read_jsonl(out / "train.jsonl"))
    # 9 train rows: 2 repeats of the France prompt (one with extra spaces), a multi-turn,
    # "Hi", an empty and a 350-character prompt; 4 validation rows: a repeat and a train prompt
    assert summary.counts["rows read"] == 13
    assert dict(summary.dropped) == {"duplicate_in_split": 3, "duplicate_of_train": 1, "empty_prompt": 1,
                                     "multi_turn": 1, "prompt_too_short": 1, "prompt_too_long": 1}


def test_helpsteer_default_length_limit_keeps_the_long_prompt(tmp_path):
    summary = preprocess_helpsteer.main(["--dataset", str(FIXTURES / "helpsteer2"), "--out_dir", str(tmp_path)])
    assert "prompt_too_long" not in summary.dropped
    assert len(prompts(tmp_path / "train.jsonl")) == 4


def test_helpsteer_missing_prompt_field_is_reported_with_its_line(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"prompt": "A fine prompt here."}) + "\n" + json.dumps({"response": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: record has no 'prompt' field"):
        preprocess_helpsteer.main(["--dataset", str(src), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def write_rated_rows(path, rows):
    """HelpSteer2-shaped rows: (prompt, response) pairs, two responses per prompt as in the real data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "response": r, "helpfulness": 3}) + "\n" for p, r in rows))


def test_helpsteer_response_length_filter_drops_every_row_of_a_prompt_with_a_long_response(tmp_path):
    src = tmp_path / "src"
    write_rated_rows(src / "train.jsonl", [
        ("Explain recursion with an example.", "x" * 10), ("Explain recursion with an example.", "y" * 21),
        ("Name two rivers in Africa.", "z" * 20), ("Name two rivers in Africa.", "w" * 5)])
    write_rated_rows(src / "validation.jsonl", [("Describe a rainbow briefly.", "v" * 30),
                                                ("Describe a rainbow briefly.", "u" * 3)])
    off = preprocess_helpsteer.main(["--dataset", str(src), "--out_dir", str(tmp_path / "off")])
    assert "response_too_long" not in off.dropped  # off by default: today's output
    assert prompts(tmp_path / "off" / "train.jsonl") == ["Explain recursion with an example.",
                                                         "Name two rivers in Africa."]
    on = preprocess_helpsteer.main(
        ["--dataset", str(src), "--out_dir", str(tmp_path / "on"), "--max_response_chars", "20"])
    assert prompts(tmp_path / "on" / "train.jsonl") == ["Name two rivers in Africa."]  # 20 characters is not over 20
    assert prompts(tmp_path / "on" / "validation.jsonl") == []
    # rows, as every filter counts
    assert on.dropped["response_too_long"] == 4 and on.dropped["duplicate_in_split"] == 1
    assert "response_too_long (rows): 4" in on.render()


def test_helpsteer_paper_filters_preset_sets_the_response_limit_and_flags_still_win(tmp_path):
    src = tmp_path / "train.jsonl"
    write_rated_rows(src, [("A prompt with a long answer.", "a" * 8001), ("A prompt with a long answer.", "b"),
                           ("A prompt at the limit.", "c" * 8000)])
    summary = preprocess_helpsteer.main(
        ["--dataset", str(src), "--out_dir", str(tmp_path / "paper"), "--paper_filters"])
    assert prompts(tmp_path / "paper" / "train.jsonl") == ["A prompt at the limit."]
    assert summary.dropped["response_too_long"] == 2 and preprocess_helpsteer.PAPER_FILTERS == {
        "max_response_chars": 8000}
    summary = preprocess_helpsteer.main(["--dataset", str(src), "--out_dir", str(tmp_path / "both"), "--paper_filters",
                                         "--max_response_chars", "0"])
    assert "response_too_long" not in summary.dropped


def test_helpsteer_response_filter_needs_the_response_field_and_a_valid_limit(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"prompt": "A fine prompt here.", "response": "ok"}) + "\n"
                   + json.dumps({"prompt": "Another fine prompt."}) + "\n")
    preprocess_helpsteer.main(["--dataset", str(src), "--out_dir", str(tmp_path / "off")])  # not needed when off
    with pytest.raises(DataError, match=r"train.jsonl:2: record has no 'response' field"):
        preprocess_helpsteer.main(
            ["--dataset", str(src), "--out_dir", str(tmp_path / "out"), "--max_response_chars", "5"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match=r"^--max_response_chars must be >= 1, or 0 \(no limit\), got -1$"):
        preprocess_helpsteer.main(
            ["--dataset", str(src), "--out_dir", str(tmp_path / "neg"), "--max_response_chars", "-1"])
    assert not (tmp_path / "neg").exists()


def test_a_length_limit_of_0_is_no_limit_in_every_preprocessor(tmp_path):
    """0 is "no limit" in the one table's rows of the length limits; HelpSteer2's --max_prompt_chars 0 and TL;DR's
    --max_post_chars 0 dropped every prompt."""
    helpsteer = preprocess_helpsteer.main(["--dataset", str(FIXTURES / "helpsteer2"), "--out_dir",
                                           str(tmp_path / "helpsteer"), "--max_prompt_chars", "0"])
    assert "prompt_too_long" not in helpsteer.dropped and len(prompts(tmp_path / "helpsteer" / "train.jsonl")) >= 3
    tldr = preprocess_tldr_dataset.main(["--dataset", str(FIXTURES / "tldr"), "--out_dir", str(tmp_path / "tldr"),
                                         "--max_post_chars", "0"])
    assert "post_too_long" not in tldr.dropped
    # the post 400 characters drop (test_tldr_outputs_prompt_format_and_every_filter) is kept
    assert len(prompts(tmp_path / "tldr" / "train.jsonl")) + len(prompts(tmp_path / "tldr" / "validation.jsonl")) == 5


# ----------------------------------------------------------------- TL;DR
def test_tldr_outputs_prompt_format_and_every_filter(tmp_path):
    out = tmp_path / "tldr_prompts_unique"
    summary = preprocess_tldr_dataset.main(["--dataset", str(FIXTURES / "tldr"), "--out_dir", str(out),
                                            "--max_post_chars", "400"])
    train, validation = prompts(out / "train.jsonl"), prompts(out / "validation.jsonl")
    assert [p.split("SUBREDDIT: r/")[1].split("\n")[0] for p in train] == ["relationships", "Guitar"]
    assert [p.split("SUBREDDIT: r/")[1].split("\n")[0] for p in validation] == ["dogs", "careerguidance"]
    first = train[0]
    assert first.startswith(preprocess_tldr_dataset.INSTRUCTION) and "TL;DR" in first
    assert "\nTITLE: Roommate eats my food\nPOST: My roommate keeps eating my food" in first
    assert summary.counts["rows read"] == 10
    assert dict(summary.dropped) == {"duplicate_in_split": 2, "duplicate_of_train": 1, "no_post": 1,
                                     "post_too_short": 1, "post_too_long": 1}
    assert not set(train) & set(validation)


def test_tldr_cross_split_dedup_does_not_depend_on_row_order(tmp_path):
    # one file, validation rows first: each row's own `split` field decides its split
    rows = read_jsonl(FIXTURES / "tldr" / "validation.jsonl") + read_jsonl(FIXTURES / "tldr" / "train.jsonl")
    src = tmp_path / "comparisons.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    summary = preprocess_tldr_dataset.main(["--dataset", str(src), "--out_dir", str(out), "--max_post_chars", "400"])
    train, validation = prompts(out / "train.jsonl"), prompts(out / "validation.jsonl")
    assert len(train) == 2 and len(validation) == 2
    assert not set(train) & set(validation)
    assert summary.dropped["duplicate_of_train"] == 1


def test_tldr_record_without_info_is_reported(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"summaries": [], "choice": 0, "split": "train"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: record has no 'info' object"):
        preprocess_tldr_dataset.main(["--dataset", str(src), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_tldr_paper_format_is_a_system_prompt_and_the_text_and_keeps_articles(tmp_path):
    out = tmp_path / "tldr_paper"
    summary = preprocess_tldr_dataset.main(["--dataset", str(FIXTURES / "tldr"), "--out_dir", str(out),
                                            "--max_post_chars", "400", "--min_post_chars", "10", "--paper_format"])
    train, validation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "validation.jsonl")
    system, user = train[0]["prompt"]
    assert system == {"role": "system", "content": preprocess_tldr_dataset.PAPER_SYSTEM_PROMPT}
    assert "one or two sentences" in system["content"] and '"TL;DR:"' in system["content"]
    assert user["role"] == "user" and user["content"].startswith("SUBREDDIT: r/relationships\nTITLE: Roommate")
    articles = [r["prompt"][1]["content"] for r in validation if "ARTICLE: " in r["prompt"][1]["content"]]
    assert articles == ["TITLE: Storm hits the coast\nARTICLE: A storm hit the coast on Monday, officials said."]
    assert "no_post" not in summary.dropped
