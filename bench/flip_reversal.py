"""The reversal of a preference flip, paired over the held-out prompts, against the placebo arm.

    .venv/bin/python bench/flip_reversal.py RUN_DIR      # a finished run with --style_schedule and --placebo

For each evaluation step: mean words per held-out reply of the feedback and placebo arms. For each pair of
consecutive evaluations: how much each arm's replies changed on the same prompts (mean +- SE over prompts),
and the difference in differences, (feedback - placebo) at the later step minus at the earlier one: what
the follow-ups of that stretch did beyond what the objective does on its own. A flip from concise to
detailed shows as a negative change in the concise phase and a positive one in the detailed phase.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from auxiliary.feedback.style_checks import count_words  # noqa: E402


def eval_words(run_dir: Path) -> dict[tuple[str, int], dict[int, int]]:
    """(arm, step) -> {prompt index: words of the reply}, from completions.jsonl's eval rows."""
    words: dict[tuple[str, int], dict[int, int]] = {}
    with open(run_dir / "completions.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            if row["phase"] == "eval":
                words.setdefault((row["arm"], row["step"]), {})[row["index"]] = count_words(row["completion"])
    return words


def mean_and_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def reversal_table(words: dict[tuple[str, int], dict[int, int]]) -> dict:
    steps = sorted({step for arm, step in words if arm == "feedback"})
    prompts = sorted(words[("feedback", steps[0])])
    table = {"steps": [{"step": s, **{arm: statistics.fmean(words[(arm, s)].values())
                                      for arm in ("feedback", "placebo")}} for s in steps], "changes": []}
    for before, after in zip(steps, steps[1:]):
        change = {arm: [words[(arm, after)][i] - words[(arm, before)][i] for i in prompts]
                  for arm in ("feedback", "placebo")}
        both = [f - p for f, p in zip(change["feedback"], change["placebo"])]
        table["changes"].append({"from": before, "to": after, "n": len(prompts),
                                 "feedback": mean_and_se(change["feedback"]),
                                 "placebo": mean_and_se(change["placebo"]),
                                 "difference_in_differences": mean_and_se(both)})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the output folder of a finished eval_online_sdpo.py run")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir}: no such folder", file=sys.stderr)
        return 2
    if not (args.run_dir / "completions.jsonl").is_file():
        print(f"error: {args.run_dir}: no completions.jsonl, not a finished online run", file=sys.stderr)
        return 2
    words = eval_words(args.run_dir)
    if ("placebo", 0) not in words:
        print(f"error: {args.run_dir}: no placebo arm (run with --placebo)", file=sys.stderr)
        return 2
    table = reversal_table(words)
    print("step  words per reply: feedback  placebo")
    for row in table["steps"]:
        print(f"{row['step']:>4}  {row['feedback']:>25.1f}  {row['placebo']:>7.1f}")
    print("steps     change in words, same prompts: feedback   placebo        feedback - placebo")
    for c in table["changes"]:
        cells = [f"{c[key][0]:+.1f} +- {c[key][1]:.1f}" for key in ("feedback", "placebo", "difference_in_differences")]
        print(f"{c['from']:>3}->{c['to']:<3}  {cells[0]:>40}  {cells[1]:>12}  {cells[2]:>16}   (n {c['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
