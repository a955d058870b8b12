"""bench/demo_search.py: the table built from fabricated run folders, the restart rule, argument errors.

No real runs: a demo run takes ~10 minutes of two CPU cores.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench import demo_search

STUTTER = "You just have to make it. You just have to make it. You just have to make it. Done."


def fabricate_run(root: Path, name: str, seed: int, feedback_rate: float, placebo_rate: float, net_se: float,
                  stutters: int = 0, wall_s: float | None = 600.0) -> Path:
    """A finished demo run folder as eval_online_sdpo.py writes it, with 4 eval prompts and 2 steps."""
    out = demo_search.run_dir(root, name, seed)
    out.mkdir(parents=True)
    baseline = [f"baseline reply number {i} about cooking" for i in range(4)]
    (out / "baseline_completions.json").write_text(json.dumps({"signature": {}, "completions": baseline}))
    (out / "config.json").write_text(json.dumps({"run": {"style": "concise"}, "sdpo": {}}))
    rows = []
    for step in (0, 2):
        for arm in ("feedback", "placebo"):
            for index in reversed(range(4)):  # out of order on purpose: the table sorts by index
                text = STUTTER if (step == 2 and arm == "feedback" and index < stutters) else f"{arm} {index} ok."
                rows.append({"step": step, "phase": "eval", "arm": arm, "index": index, "completion": text})
        rows.append({"step": step, "phase": "train", "arm": "feedback", "index": 0, "completion": STUTTER * 2})
    (out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final_step": 2, "baseline_mean_words": 5.0,
               "final": {"concise": {"feedback": {"win_rate": feedback_rate, "se": 9.0, "mean_words": 3.0},
                                     "placebo": {"win_rate": placebo_rate, "se": 9.5, "mean_words": 4.0},
                                     "net_effect": {"diff": feedback_rate - placebo_rate, "se": net_se}}},
               "head_to_head_feedback_vs_placebo": {"concise": {"win_rate": 62.5, "se": 8.0, "wins": 5, "losses": 3,
                                                                "ties": 0}},
               "paired_style_score_feedback_minus_placebo": {"concise": {"diff": 1.5, "se": 0.5}}}
    (out / "summary.json").write_text(json.dumps(summary))
    if wall_s is not None:
        (out / demo_search.RUN_RECORD).write_text(json.dumps({"setting": name, "seed": seed, "flags": ["--lr", "1"],
                                                              "wall_s": wall_s}))
    return out


def test_table_row_reads_the_run_and_counts_degenerate_final_replies(tmp_path):
    out = fabricate_run(tmp_path, "lora-1e-4", 7, feedback_rate=80.0, placebo_rate=50.0, net_se=12.0, stutters=3)
    row = demo_search.table_row(out)
    assert (row["setting"], row["seed"], row["final_step"], row["n"]) == ("lora-1e-4", 7, 2, 4)
    assert row["win_rate"]["feedback"] == {"rate": 80.0, "se": 9.0}
    assert row["net_effect"] == {"diff": 30.0, "se": 12.0, "beyond_2se": True}
    # Only the final step's eval replies count: the stuttering train reply and step 0 do not.
    assert row["degenerate"] == {"baseline": 0, "feedback": 3, "placebo": 0}
    assert row["degenerate_within_goal"] is False  # 3 > 0 + 2
    assert row["mean_words"] == {"baseline": 5.0, "feedback": 3.0, "placebo": 4.0}
    assert row["head_to_head"]["rate"] == 62.5 and row["wall_s"] == 600.0
    assert row["head_to_head"]["beyond_2se"] is False  # 62.5 - 50 < 2 x 8.0
    assert row["paired_score"] == {"diff": 1.5, "se": 0.5, "beyond_2se": True}
    assert row["degenerate_rule"] == "text"


def test_table_row_takes_the_runs_own_relevance_aware_degenerate_counts(tmp_path):
    out = fabricate_run(tmp_path, "contrast", 1, feedback_rate=80.0, placebo_rate=50.0, net_se=12.0)
    summary = json.loads((out / "summary.json").read_text())
    # the run counted replies that ignore their request, which the text rules here cannot see
    summary["degenerate_replies"] = {"concise": {"n": 4, "baseline": 1, "feedback": 3, "placebo": 2}}
    summary["collapse_monitors"] = {"concise": {"feedback": {"ignoring_replies": 3},
                                                "placebo": {"ignoring_replies": 1}}}
    (out / "summary.json").write_text(json.dumps(summary))
    row = demo_search.table_row(out)
    assert row["degenerate"] == {"baseline": 1, "feedback": 3, "placebo": 2}
    assert row["ignoring_request"] == {"feedback": 3, "placebo": 1} and row["degenerate_rule"] == "relevance"
    assert row["degenerate_within_goal"] is True
    assert "| 1 / 3 / 2 of 4 (relevance) | yes |" in demo_search.markdown_table([row])


def test_net_effect_within_2_se_and_a_negative_effect_are_not_beyond(tmp_path):
    within = demo_search.table_row(fabricate_run(tmp_path, "a", 1, 60.0, 50.0, net_se=5.0))  # 10 = 2 SE
    negative = demo_search.table_row(fabricate_run(tmp_path, "b", 1, 20.0, 60.0, net_se=5.0))
    assert within["net_effect"]["beyond_2se"] is False
    assert negative["net_effect"]["beyond_2se"] is False
    assert within["degenerate_within_goal"] is True


def test_final_texts_are_in_prompt_order(tmp_path):
    out = fabricate_run(tmp_path, "a", 1, 50.0, 50.0, 1.0, stutters=1)
    texts = demo_search.final_eval_texts(out, 2)
    assert texts["placebo"] == [f"placebo {i} ok." for i in range(4)]
    assert texts["feedback"][0] == STUTTER and texts["feedback"][1] == "feedback 1 ok."


def test_table_orders_runs_by_settings_then_seed_and_writes_markdown_and_json(tmp_path):
    fabricate_run(tmp_path, "lora-1e-4", 2, 70.0, 50.0, 8.0)
    fabricate_run(tmp_path, "lora-1e-4", 1, 60.0, 50.0, 8.0, wall_s=None)  # no record: name and seed from the folder
    fabricate_run(tmp_path, "default", 1234, 56.7, 56.7, 12.8)
    (tmp_path / "k-0-s1").mkdir()  # a run that was cut off: no summary.json, not in the table
    rows = demo_search.write_table(tmp_path)
    assert [(r["setting"], r["seed"]) for r in rows] == [("default", 1234), ("lora-1e-4", 1), ("lora-1e-4", 2)]
    assert json.loads((tmp_path / "table.json").read_text()) == rows
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert len(lines) == 2 + 3
    # the headline first (head to head, paired score), then the win rates vs the baseline and the net effect
    assert lines[0].startswith("| setting | seed | head to head | > 2 SE | paired score f - p | > 2 SE | feedback vs")
    assert lines[2] == (
        "| default | 1234 | 62.5 ± 8.0 | no | +1.5 ± 0.5 | yes | 56.7 ± 9.0 | 56.7 ± 9.5 | +0.0 ± 12.8 | no "
        "| 0 / 0 / 0 of 4 | yes | 5.0 / 3.0 / 4.0 | 10:00 |")
    assert lines[3].endswith("| +10.0 ± 8.0 | no | 0 / 0 / 0 of 4 | yes | 5.0 / 3.0 / 4.0 | n/a |")
    assert "| +20.0 ± 8.0 | yes |" in lines[4]


def test_a_finished_run_is_skipped_without_starting_anything(tmp_path):
    fabricate_run(tmp_path, "default", 5, 50.0, 50.0, 1.0)
    line = demo_search.run_one("default", [], 5, tmp_path, python="/nonexistent/python", niceness=10)
    assert line == "default-s5: done before, skipped"


def test_run_command_puts_the_overrides_after_the_profile():
    command = demo_search.run_command("py", ["--lr", "1e-5"], 3, Path("/r/x-s3"))
    assert command == ["py", "eval_online_sdpo.py", "--config", "configs/demo.yaml", *demo_search.SEARCH_BASE,
                       "--lr", "1e-5", "--seed", "3", "--output_dir", "/r/x-s3", "--overwrite"]


def test_any_flag_of_a_setting_reaches_the_run_as_written():
    """Values with spaces and list-valued flags pass through unchanged (no shell) and override the profile."""
    flags = ["--placebo_texts", "Fine, thanks.", "Noted.", "--hindsight_template", "The user then said: {followup}",
             "--relevance_model", "", "--eval_n", "60"]
    command = demo_search.run_command("py", flags, 3, Path("/r/x-s3"))
    assert command[4 + len(demo_search.SEARCH_BASE):-5] == flags
    config = _demo_config(flags)
    assert config["placebo_texts"] == ["Fine, thanks.", "Noted."] and config["eval_n"] == 60
    assert config["relevance_model"] == "" and config["hindsight_template"] == "The user then said: {followup}"


@pytest.mark.parametrize("argv, message", [
    (["--settings", "no-such-setting"], "unknown setting(s) no-such-setting"),
    (["--settings", "default", "default"], "listed twice"),
    (["--seeds", "1", "1"], "listed twice"),
    (["--parallel", "3"], "--parallel must be 1 or 2"),
    (["--seeds", "one"], "invalid int value"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_search.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _demo_config(flags: list[str]) -> dict:
    from auxiliary.runtime.cli import parse_dataclasses
    from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig

    sdpo, run = parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig),
                                  ["--config", str(demo_search.REPO_ROOT / demo_search.PROFILE), *flags])
    return {**dataclasses.asdict(sdpo), **dataclasses.asdict(run)}


@pytest.mark.parametrize("name", [name for name in demo_search.SETTINGS if name != "default"])
def test_every_setting_changes_exactly_the_fields_its_flags_name(name):
    """A typo or a value equal to the profile's would make a setting a silent copy of the default."""
    flags = demo_search.SETTINGS[name]
    default = _demo_config(demo_search.SEARCH_BASE)
    changed = {key for key, value in _demo_config(demo_search.SEARCH_BASE + flags).items() if value != default[key]}
    named = {flag.removeprefix("--") for flag in flags if flag.startswith("--")}
    assert changed == named


def test_the_search_base_is_the_profile_before_issue_27_and_the_profile_is_its_chosen_setting():
    base = _demo_config(demo_search.SEARCH_BASE)
    assert (base["teacher"], base["contrast_followup"], base["copy_guard_ngram"], base["end_signal_weight"]) == (
        "live", "", 0, 0)
    profile = _demo_config([])
    assert profile == _demo_config(demo_search.SEARCH_BASE + demo_search.SETTINGS[demo_search.PROFILE_SETTING])
    assert profile != base


def test_copy_tokens_are_the_repeats_of_an_earlier_trigram():
    from bench.demo_copy_signal import centred, copy_tokens, mean_and_se

    ids = [5, 6, 7, 8, 5, 6, 7, 9, 6, 7, 8]
    # position 6 closes (5, 6, 7) seen at 0-2; position 10 closes (6, 7, 8) seen at 1-3; 9 closes (9, 6, 7): new
    assert copy_tokens(ids, 0) == [False] * 6 + [True, False, False, False, True]
    assert copy_tokens(ids, 4) == [False, False, True, False, False, False, True]
    assert centred([9.0, 1.0, 2.0, 3.0], 1) == [-1.0, 0.0, 1.0]
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(se - (1.0 / 3) ** 0.5) < 1e-12
