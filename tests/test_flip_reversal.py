"""bench/flip_reversal.py: the per-prompt changes and their difference in differences, against a hand count."""
import json

import pytest

from bench import flip_reversal


def write_run(folder, words):
    """words[(arm, step)] = words per prompt; each reply is that many 'w' words."""
    with open(folder / "completions.jsonl", "w") as handle:
        for (arm, step), counts in words.items():
            for index, n in enumerate(counts):
                row = {"step": step, "phase": "eval", "arm": arm, "index": index, "prompt": "p",
                       "completion": " ".join(["w"] * n)}
                handle.write(json.dumps(row) + "\n")
        handle.write(json.dumps({"step": 1, "phase": "train", "arm": "feedback", "index": 0, "prompt": "p",
                                 "completion": "w " * 500}) + "\n")


def test_the_changes_are_paired_over_prompts_and_the_placebo_is_subtracted(tmp_path, capsys):
    write_run(tmp_path, {("feedback", 0): [70, 80, 60], ("placebo", 0): [70, 80, 60],
                         ("feedback", 20): [50, 60, 40], ("placebo", 20): [72, 78, 61],
                         ("feedback", 40): [70, 82, 58], ("placebo", 40): [71, 80, 60]})
    table = flip_reversal.reversal_table(flip_reversal.eval_words(tmp_path))
    assert [(r["step"], r["feedback"], r["placebo"]) for r in table["steps"]] == [
        (0, 70.0, 70.0), (20, 50.0, 70.0 + 1 / 3), (40, 70.0, 70.0 + 1 / 3)]
    first, second = table["changes"]
    assert first["feedback"] == (-20.0, 0.0)
    # feedback +20, +22, +18; placebo -1, +2, -1; their differences +21, +20, +19: mean 20, SE 1/sqrt(3)
    assert second["feedback"][0] == 20.0 and second["placebo"][0] == 0.0
    mean, se = second["difference_in_differences"]
    assert mean == 20.0 and se == pytest.approx(1 / 3 ** 0.5)
    assert flip_reversal.main([str(tmp_path)]) == 0
    assert "+20.0 +- 0.6   (n 3)" in capsys.readouterr().out


def test_a_folder_without_a_run_or_a_placebo_is_one_line(tmp_path, capsys):
    assert flip_reversal.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert flip_reversal.main([str(tmp_path)]) == 2
    assert "no completions.jsonl" in capsys.readouterr().err
    write_run(tmp_path, {("feedback", 0): [1, 2], ("feedback", 5): [1, 2]})
    assert flip_reversal.main([str(tmp_path)]) == 2
    assert "no placebo arm" in capsys.readouterr().err
