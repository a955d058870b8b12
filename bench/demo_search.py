"""The settings search of `make demo` (issue #18): run the demo with named settings and seeds, and tabulate.

    .venv/bin/python bench/demo_search.py --settings default lora-1e-4 --seeds 1234 --parallel 2
    .venv/bin/python bench/demo_search.py --table-only          # rebuild the table from the run folders

Each setting is a list of flag overrides over the search base (SETTINGS below, the record of what was
tried): configs/demo.yaml with SEARCH_BASE after it, the profile as it was before issue #27 (the profile
is now the setting PROFILE_SETTING). One run per (setting, seed) goes to ROOT/<name>-s<seed>/; a run whose summary.json
exists is skipped, so the search can be stopped and restarted. Each run is a child process with one
torch thread under `nice`; the profile's `arms_in_parallel` runs its two arms side by side, one core
each, so on a 2-core machine run one at a time (`--parallel 1`); its wall time and the load average
around it are written to ROOT/<name>-s<seed>/search_run.json.

A setting's flags go to eval_online_sdpo.py as they are, after the profile and SEARCH_BASE (so they override them) and
before the search's --seed and --output_dir: any flag of OnlineSDPOConfig or OnlineRunConfig, a value
with spaces or a list included; search_run.json and table.json record them.

The table (ROOT/table.md and ROOT/table.json) has, per run, the demo's headline first: the head to head
of the arms (+- SE) and whether it is beyond 2 SE from 50%, the paired rule-score difference of the arms
(for concise: minus words per reply, a degenerate reply scored no higher than the worst sound one) and
whether it is beyond 2 SE from 0; then the win rate against the baseline of the feedback and placebo
arms at the final step (+- SE), the net effect (feedback - placebo) +- SE and whether it is beyond 2 SE;
the degenerate eval replies of the baseline, feedback and placebo as the run counted them (summary.json:
with the relevance rule when the run had --relevance_model, as make demo has; runs without the count are
recounted here from completions.jsonl by the text rules) and whether the feedback arm's are within the
baseline's + 2; mean words per reply of each, and wall time. The results are discussed in
docs/demo_search.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE = "configs/demo.yaml"
DEFAULT_ROOT = Path("/tmp/demo_search")
RUN_RECORD = "search_run.json"
# Issue #18: feedback's degenerate replies may exceed the baseline's by at most this many of n.
DEGENERATE_ALLOWANCE = 2

# Every setting is a list of flags over the search's base: configs/demo.yaml as it was before issue #27 chose
# the profile's teacher, contrast and copy guard (these flags turn today's profile back into it), so that each
# name stays the experiment its rows measured.
SEARCH_BASE = ["--teacher", "live", "--contrast_followup", "", "--copy_guard_ngram", "0", "--end_signal_weight", "0"]
# the setting that configs/demo.yaml is today (tests/test_demo_search.py holds them equal)
PROFILE_SETTING = "contrast-guard3-frozen-end1"
CONTRAST_GUARD = ["--contrast_followup", "Thanks.", "--copy_guard_ngram", "3"]
LORA = ["--use_lora", "true"]  # rank 16, alpha 32 (the defaults), on every linear layer
# name -> flags over the search base. Append, never rewrite: the table refers to these names.
SETTINGS: dict[str, list[str]] = {
    "default": [],
    # LoRA dropout was 0.05 by default when these ran; it is 0 now (the paper's), so they name it
    "lora-1e-4": LORA + ["--lora_dropout", "0.05", "--lr", "1e-4"],
    "lora-3e-5": LORA + ["--lora_dropout", "0.05", "--lr", "3e-5"],
    "lora-3e-4": LORA + ["--lora_dropout", "0.05", "--lr", "3e-4"],
    "lr-2e-6": ["--lr", "2e-6"],
    "lr-1e-5": ["--lr", "1e-5"],
    "beta-0.05": ["--beta", "0.05"],
    "beta-0.1": ["--beta", "0.1"],
    "k-0": ["--ignore_first_k", "0"],
    "full-distillation": ["--loss_mode", "full_distillation"],
    "train-30": ["--train_n", "30", "--eval_every", "15"],
    # --arms_in_parallel (the profile's since 2026-12-02) refuses dropout: LoRA without it, the arms side by side
    # (dropout 0: the default now)
    "lora-1e-4-d0": LORA + ["--lr", "1e-4"],
    "lora-3e-5-d0": LORA + ["--lr", "3e-5"],
    "lora-3e-4-d0": LORA + ["--lr", "3e-4"],
    # issue #27: the signal against a neutral follow-up ("Thanks."; the placebo says "OK, thanks.") and no signal on
    # tokens that complete a repeated trigram; evaluated on 60 prompts at steps 0 and 20 with the relevance rule
    "contrast-guard3": CONTRAST_GUARD,
    "contrast-guard3-nocenter": CONTRAST_GUARD + ["--center_signal", "false"],
    "contrast-guard3-frozen-1e-5": CONTRAST_GUARD + ["--teacher", "frozen", "--lr", "1e-5"],
    # the guard at n = 2 also masks the token that starts a repeat (the lead-in the trigram guard leaves)
    "contrast-guard2": ["--contrast_followup", "Thanks.", "--copy_guard_ngram", "2"],
    "contrast-guard3-frozen-5e-6": CONTRAST_GUARD + ["--teacher", "frozen"],
    # no 96-token training reply of the rows above ended by itself (metrics.jsonl: reply_finished false in all
    # 20), so the end of a reply never carried a signal; 192 tokens let some of them end (the eval stays at 96)
    "contrast-guard2-train192": ["--contrast_followup", "Thanks.", "--copy_guard_ngram", "2",
                                 "--max_new_tokens", "192"],
    "contrast-guard2-frozen-train192": ["--contrast_followup", "Thanks.", "--copy_guard_ngram", "2",
                                        "--max_new_tokens", "192", "--teacher", "frozen"],
    # the end of a reply gets a signal without the reply having to end: at each position, the hindsight signal of
    # the end-of-turn token (it rises at sentence ends under "too long" and not under "Thanks.")
    "contrast-guard3-frozen-end1": CONTRAST_GUARD + ["--teacher", "frozen", "--end_signal_weight", "1"],
    # at weight 1 the end term's gradient is tens of times the sampled tokens' (both arms): a smaller weight
    "contrast-guard3-frozen-end0.3": CONTRAST_GUARD + ["--teacher", "frozen", "--end_signal_weight", "0.3"],
    # 0.3 broke more replies than 1: the other way
    "contrast-guard3-frozen-end3": CONTRAST_GUARD + ["--teacher", "frozen", "--end_signal_weight", "3"],
    # the copy guard no longer removes the end term: inside a loop, where stopping is what the user wants
    "contrast-guard3-frozen-end1-loopend": CONTRAST_GUARD + ["--teacher", "frozen", "--end_signal_weight", "1",
                                                             "--end_signal_copy_guard", "false"],
    # the end signal centred per reply: where in the reply stopping should rise, not a push to stop everywhere
    "contrast-guard3-frozen-end1-centred": CONTRAST_GUARD + ["--teacher", "frozen", "--end_signal_weight", "1",
                                                             "--end_signal_center", "true"],
}


def run_dir(root: Path, name: str, seed: int) -> Path:
    return root / f"{name}-s{seed}"


def run_command(python: str, flags: list[str], seed: int, out: Path) -> list[str]:
    # --overwrite: a folder without summary.json is a run that was cut off; start it again clean.
    return [python, "eval_online_sdpo.py", "--config", PROFILE, *SEARCH_BASE, *flags, "--seed", str(seed),
            "--output_dir", str(out), "--overwrite"]


def run_one(name: str, flags: list[str], seed: int, root: Path, python: str, niceness: int) -> str:
    out = run_dir(root, name, seed)
    if (out / "summary.json").exists():
        return f"{out.name}: done before, skipped"
    out.mkdir(parents=True, exist_ok=True)
    command = run_command(python, flags, seed, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "PYTHONPATH": str(REPO_ROOT)}
    load_before, started = os.getloadavg()[0], time.time()
    with open(root / f"{out.name}.log", "w") as log:
        returncode = subprocess.call(["nice", "-n", str(niceness), *command], cwd=REPO_ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
    record = {"setting": name, "seed": seed, "flags": flags, "command": command, "returncode": returncode,
              "wall_s": round(time.time() - started, 1), "loadavg_1min_start": load_before,
              "loadavg_1min_end": os.getloadavg()[0]}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return f"{out.name}: exit {returncode} after {record['wall_s']:.0f} s"


def final_eval_texts(out: Path, step: int) -> dict[str, list[str]]:
    """The eval replies of each arm at `step`, in prompt order, from completions.jsonl."""
    rows: dict[str, list[tuple[int, str]]] = {}
    with open(out / "completions.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            if row["phase"] == "eval" and row["step"] == step:
                rows.setdefault(row["arm"], []).append((row["index"], row["completion"]))
    return {arm: [text for _, text in sorted(pairs)] for arm, pairs in rows.items()}


def table_row(out: Path) -> dict:
    """One finished run folder -> the numbers of the table."""
    from auxiliary.evals.collapse import text_monitors

    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    record_path = out / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    style = config["run"]["style"]
    final = summary["final"][style]
    step = summary["final_step"]
    texts = final_eval_texts(out, step)
    texts["baseline"] = json.loads((out / "baseline_completions.json").read_text())["completions"]
    counted = summary.get("degenerate_replies", {}).get(style)
    if counted:  # the run's own count: with the relevance rule when it had a --relevance_model
        degenerate = {arm: counted[arm] for arm in ("baseline", "feedback", "placebo")}
    else:
        degenerate = {arm: text_monitors(texts[arm])["degenerate_replies"]
                      for arm in ("baseline", "feedback", "placebo")}
    monitors = summary.get("collapse_monitors", {}).get(style, {})
    ignoring = {arm: monitors[arm].get("ignoring_replies") for arm in ("feedback", "placebo") if arm in monitors}
    net = final["net_effect"]
    head = summary["head_to_head_feedback_vs_placebo"].get(style, {})
    paired = summary.get("paired_style_score_feedback_minus_placebo", {}).get(style, {})
    name, _, seed = out.name.rpartition("-s")
    return {
        "setting": record.get("setting", name), "seed": record.get("seed", int(seed)),
        "flags": record.get("flags"), "style": style, "final_step": step, "n": len(texts["baseline"]),
        "win_rate": {arm: {"rate": final[arm]["win_rate"], "se": final[arm]["se"]} for arm in ("feedback", "placebo")},
        "net_effect": {"diff": net["diff"], "se": net["se"],
                       "beyond_2se": net["se"] is not None and net["diff"] > 2 * net["se"]},
        "head_to_head": {"rate": head.get("win_rate"), "se": head.get("se"), "wins": head.get("wins"),
                         "losses": head.get("losses"), "ties": head.get("ties"),
                         "beyond_2se": beyond_2se(head.get("win_rate"), head.get("se"), 50.0)},
        # The style's rule score per reply, feedback - placebo over the same prompts (concise: minus words).
        "paired_score": {"diff": paired.get("diff"), "se": paired.get("se"),
                         "beyond_2se": beyond_2se(paired.get("diff"), paired.get("se"), 0.0)},
        "degenerate": degenerate,
        "degenerate_rule": "relevance" if any(v is not None for v in ignoring.values()) else "text",
        "ignoring_request": ignoring,
        "degenerate_within_goal": degenerate["feedback"] <= degenerate["baseline"] + DEGENERATE_ALLOWANCE,
        "mean_words": {"baseline": summary["baseline_mean_words"], "feedback": final["feedback"]["mean_words"],
                       "placebo": final["placebo"]["mean_words"]},
        "wall_s": record.get("wall_s"),
        "loadavg_1min": [record.get("loadavg_1min_start"), record.get("loadavg_1min_end")],
    }


def beyond_2se(value: float | None, se: float | None, null: float) -> bool:
    """value - null > 2 SE (one-sided: the feedback arm ahead); False when undefined."""
    return value is not None and se is not None and value - null > 2 * se


def collect_rows(root: Path) -> list[dict]:
    """Every finished run under `root`, in the order of SETTINGS (then by name), then by seed."""
    order = {name: i for i, name in enumerate(SETTINGS)}
    rows = [table_row(path.parent) for path in root.glob("*/summary.json")]
    return sorted(rows, key=lambda r: (order.get(r["setting"], len(order)), r["setting"], r["seed"]))


def _rate(value: float | None, se: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    shown = f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"{shown} (SE undefined)" if se is None else f"{shown} ± {se:.1f}"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def markdown_table(rows: list[dict]) -> str:
    headers = ["setting", "seed", "head to head", "> 2 SE", "paired score f - p", "> 2 SE", "feedback vs baseline",
               "placebo vs baseline", "net effect", "> 2 SE", "degenerate b / f / p", "f <= b + 2", "words b / f / p",
               "wall (m:s)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    for r in rows:
        words = " / ".join(f"{r['mean_words'][arm]:.1f}" for arm in ("baseline", "feedback", "placebo"))
        degenerate = " / ".join(str(r["degenerate"][arm]) for arm in ("baseline", "feedback", "placebo"))
        rule = " (relevance)" if r.get("degenerate_rule") == "relevance" else ""
        cells = [r["setting"], str(r["seed"]), _rate(r["head_to_head"]["rate"], r["head_to_head"]["se"]),
                 yes(r["head_to_head"].get("beyond_2se")),
                 _rate(r["paired_score"]["diff"], r["paired_score"]["se"], signed=True),
                 yes(r["paired_score"].get("beyond_2se")),
                 _rate(r["win_rate"]["feedback"]["rate"], r["win_rate"]["feedback"]["se"]),
                 _rate(r["win_rate"]["placebo"]["rate"], r["win_rate"]["placebo"]["se"]),
                 _rate(r["net_effect"]["diff"], r["net_effect"]["se"], signed=True), yes(r["net_effect"]["beyond_2se"]),
                 f"{degenerate} of {r['n']}{rule}", yes(r["degenerate_within_goal"]), words, _minutes(r["wall_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(root: Path) -> list[dict]:
    rows = collect_rows(root)
    (root / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (root / "table.md").write_text(markdown_table(rows))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                        help=f"named settings to run (default: all): {', '.join(SETTINGS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="one folder per run under it")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (1 or 2 on a 2-core machine)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of each run")
    parser.add_argument("--python", default=str(REPO_ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--table-only", action="store_true", help="run nothing; rebuild the table")
    args = parser.parse_args(argv)
    unknown = [name for name in args.settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    if len(set(args.settings)) != len(args.settings) or len(set(args.seeds)) != len(args.seeds):
        parser.error("a setting or seed is listed twice")
    if not 1 <= args.parallel <= 2:
        parser.error("--parallel must be 1 or 2 (each run already takes a core)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        jobs = [(name, SETTINGS[name], seed) for seed in args.seeds for name in args.settings]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for line in pool.map(lambda job: run_one(*job, args.root, args.python, args.nice), jobs):
                print(line, flush=True)
    rows = write_table(args.root)
    print(markdown_table(rows), end="")
    print(f"table: {args.root / 'table.md'} and {args.root / 'table.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
