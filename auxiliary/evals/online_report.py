"""What an online run reports at the end: summary.json and the printed summary.

    summary = build_summary(history, styles, last_step, baseline, texts, head_to_head, out,
                            style_texts=None, phase_ends=None)   # a schedule: the forgetting table's rows
    print(summary_text(summary, history, arms, styles, baseline, texts, eval_prompts, out))

`history` is eval_history.json (one record per eval step, style and arm), `texts` the final eval
replies of each arm, `head_to_head` the judged feedback-vs-placebo win rates per style (the run
judges; this module only counts and formats). Also here: the win-rate table (summary_table), the
paired rule-score difference of the two arms (paired_score_difference) and, for a style schedule,
the forgetting table (rows: the start and the end of each phase, columns: styles; forgetting_table).
"""
from __future__ import annotations

import math
from pathlib import Path

from auxiliary.evals.evaluation_helpers import MIN_DECISIVE_FOR_SE, net_effect, prompt_as_text

FINAL_FIELDS = ("win_rate", "se", "wins", "losses", "ties", "mean_words")
CELL_FIELDS = ("win_rate", "se", "wins", "losses", "ties", "n")


def initial_baseline(history: list[dict]) -> list[dict]:
    """The records against the run's baseline (the initial policy or --baseline_model), not a phase snapshot."""
    return [r for r in history if r.get("baseline", "initial") == "initial"]


def words(text: str) -> int:
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def mean_words(texts: list[str]) -> float:
    return sum(map(words, texts)) / len(texts)


def fmt_rate(record: dict) -> str:
    decisive = f"{record['wins'] + record['losses']}/{record['n']} decisive"
    if record.get("win_rate") is None:
        return f"-  ({decisive})"
    if record.get("se") is None:
        return f"{record['win_rate']:.1f}, SE undefined ({decisive}; {MIN_DECISIVE_FOR_SE} needed)"
    return f"{record['win_rate']:.1f} +- {record['se']:.1f} ({decisive})"


def fmt_diff(net: dict) -> str:
    """A net effect in points: +- its SE, or "SE undefined" when an arm has too few decisive pairs."""
    if net["se"] is None:
        return f"{net['diff']:+.1f} (SE undefined)"
    return f"{net['diff']:+.1f} +- {net['se']:.1f}"


def _style_check(style: str):
    from auxiliary.feedback.style_checks import build_style_checks

    return build_style_checks().get(style)


def rule_scores(style: str, replies: list[list[str]], broken: list[list[bool]]) -> list[list[float]] | None:
    """Each source's rule score per prompt (`replies[k][i]`: source k's reply to prompt i), a broken reply
    (`broken[k][i]`) scored no higher than the lowest-scoring sound reply to its prompt (the lowest of
    all when none is sound): a degenerate reply never gains on style, here as in the rule judge."""
    check = _style_check(style)
    if check is None:
        return None
    raw = [[check.score(text) for text in source] for source in replies]
    scores = [list(source) for source in raw]
    for i in range(len(raw[0]) if raw else 0):
        sound = [raw[k][i] for k in range(len(raw)) if not broken[k][i]]
        floor = min(sound) if sound else min(raw[k][i] for k in range(len(raw)))
        for k in range(len(raw)):
            if broken[k][i]:
                scores[k][i] = min(raw[k][i], floor)
    return scores


def paired_score_difference(style: str, texts_a: list[str], texts_b: list[str], baseline: list[str] | None = None,
                            prompts: list | None = None, relevance=None) -> dict | None:
    """Mean and SE of score(a_i) - score(b_i) over the same prompts: a paired, sensitive comparison. A
    degenerate reply (relevance.degenerate_reasons: the relevance rule too when `relevance` and `prompts`
    are given) scores no higher than the worst sound reply to its prompt among a, b and `baseline`."""
    from auxiliary.feedback.relevance import degenerate_reasons

    if _style_check(style) is None or len(texts_a) != len(texts_b) or len(texts_a) < 2:
        return None
    sources = [list(texts_a), list(texts_b)] + ([list(baseline)] if baseline and len(baseline) == len(texts_a) else [])
    broken = [[bool(found) for found in degenerate_reasons(prompts, source, relevance)] for source in sources]
    scores = rule_scores(style, sources, broken)
    diffs = [a - b for a, b in zip(scores[0], scores[1])]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"n": n, "diff": mean, "se": math.sqrt(var / n), "feedback": sum(scores[0]) / n,
            "placebo": sum(scores[1]) / n, "baseline_score": sum(scores[2]) / n if len(scores) > 2 else None}


def summary_table(history: list[dict], arms: list[str], styles: list[str]) -> str:
    """Win rate per eval step, style and arm, plus the net effect when a placebo arm ran."""
    header = ["step", "style"] + arms + (["net (feedback - placebo)"] if "placebo" in arms else [])
    history = initial_baseline(history)
    rows = []
    for step in sorted({r["step"] for r in history}):
        for style in styles:
            by_arm = {r["arm"]: r for r in history if r["step"] == step and r["style"] == style}
            if not by_arm:
                continue
            row = [str(step), style] + [fmt_rate(by_arm[a]) if a in by_arm else "" for a in arms]
            if "placebo" in arms and {"feedback", "placebo"} <= set(by_arm):
                net = net_effect(by_arm["feedback"], by_arm["placebo"])
                row.append("-" if net["diff"] is None else fmt_diff(net))
            rows.append(row)
    title = "win rate of the policy vs the baseline (%, ties excluded, +- analytic SE, decisive pairs / n)"
    return render_table(title, header, rows)


def render_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([title, render(header), render(["-" * w for w in widths])] + [render(r) for r in rows])


def forgetting_table(history: list[dict], styles: list[str], phase_ends: list[dict]) -> list[dict]:
    """Per row of `phase_ends` (label, step, phase, style): each arm's win rate vs the baseline on every style."""
    rows = []
    for end in phase_ends:
        cells: dict = {}
        for record in initial_baseline(history):
            if record["step"] == end["step"] and record["style"] in styles:
                cells.setdefault(record["arm"], {})[record["style"]] = {k: record[k] for k in CELL_FIELDS}
        rows.append({**end, "win_rates": cells})
    return rows


def forgetting_text(forgetting: list[dict], arms: list[str], styles: list[str]) -> str:
    """One table per arm: rows the start and the end of each phase, columns the styles."""
    parts = []
    for arm in arms:
        rows = [[row["label"], str(row["step"])] + [fmt_cell(row["win_rates"].get(arm, {}).get(style))
                                                    for style in styles] for row in forgetting]
        parts.append(render_table(f"forgetting table, {arm} arm: win rate vs the baseline (%, +- SE) at the end of "
                                  "each phase", ["row", "step"] + styles, rows))
    return "\n\n".join(parts)


def fmt_cell(record: dict | None) -> str:
    if record is None:
        return ""
    if record["win_rate"] is None:
        return "-"
    if record.get("se") is None:
        return f"{record['win_rate']:.1f} (SE undefined)"
    return f"{record['win_rate']:.1f} +- {record['se']:.1f}"


def snapshot_records(history: list[dict]) -> list[dict]:
    """--phase_baseline snapshot: the end of each phase, its style against the policy at the phase's start."""
    ends: dict = {}
    for record in history:
        if record.get("baseline") == "snapshot":
            key = (record["phase"], record["arm"])
            if key not in ends or record["step"] > ends[key]["step"]:
                ends[key] = record
    return [{k: r[k] for k in ("phase", "style", "arm", "step", "snapshot_step") + CELL_FIELDS}
            for _, r in sorted(ends.items())]


def collapse_summary(history: list[dict], styles: list[str], last_step: int | None, baseline: list[str],
                     eval_prompts: list | None = None, relevance=None) -> dict:
    """From the final evaluation's records: per style, degenerate replies {"n", "baseline", "feedback",
    "placebo"} (counts of n; the baseline's with the relevance rule when `relevance` is given, as the
    arms' monitors were), and per style and arm the collapse monitors and their warnings."""
    from auxiliary.evals.collapse import text_monitors

    degenerate, monitors = {}, {}
    base = text_monitors(baseline, eval_prompts, relevance)["degenerate_replies"] if baseline else None
    for style in styles:
        final = {r["arm"]: r["monitors"] for r in initial_baseline(history)
                 if r["step"] == last_step and r["style"] == style and "monitors" in r}
        if not final:
            continue
        degenerate[style] = {"n": len(baseline), "baseline": base,
                             **{arm: m["degenerate_replies"] for arm, m in sorted(final.items())}}
        monitors[style] = final
    return {"degenerate_replies": degenerate, "collapse_monitors": monitors}


def collapse_text(summary: dict, last_step) -> list[str]:
    """The degenerate-reply counts and collapse monitors at the final evaluation, with any warning; a
    style whose replies are those of the style before (one shared policy) is not repeated."""
    lines, shown = [], []
    for style, counts in summary.get("degenerate_replies", {}).items():
        monitors = summary["collapse_monitors"][style]
        if (counts, monitors) in shown:
            continue
        shown.append((counts, monitors))
        arms = ", ".join(f"{arm} {counts[arm]}/{counts['n']}" for arm in ("feedback", "placebo") if arm in counts)
        ignoring = {arm: m["ignoring_replies"] for arm, m in monitors.items() if m.get("ignoring_replies") is not None}
        what = ", nothing or a reply that ignores the request" if ignoring else " or nothing"
        of_them = f" (ignoring the request: {', '.join(f'{a} {k}' for a, k in ignoring.items())})" if ignoring else ""
        lines.append(f"degenerate replies at step {last_step} ({style}; a repeated phrase, an answer to the follow-up"
                     f"{what}): baseline {counts['baseline']}/{counts['n']}, {arms}{of_them}")
        for arm, m in monitors.items():
            parts = [f"distinct-2 {m['distinct_2']:.2f}"]
            if m.get("entropy_ratio") is not None:
                parts.append(f"token entropy x{m['entropy_ratio']:.2f} of step 0")
            if m.get("logprob_drift") is not None:
                parts.append(f"baseline replies {m['logprob_drift']:+.2f} nats/token vs step 0")
            lines.append(f"  collapse monitors, {arm}: " + ", ".join(parts))
            lines += [f"  WARNING ({arm}): {warning}" for warning in m["warnings"]]
    return lines


def build_summary(history: list[dict], styles: list[str], last_step: int | None, baseline: list[str],
                  texts: dict[str, list[str]], head_to_head: dict, out: Path, style_texts: dict | None = None,
                  phase_ends: list[dict] | None = None, eval_prompts: list | None = None, relevance=None) -> dict:
    """summary.json: first the headline (per style, the paired comparison of the arms and beside it their
    win rates against the baseline, the net effect and the degenerate replies: headline), then the final
    win rates per style and arm (with the net effect), the head-to-head and the paired rule-score
    difference of the arms; `style_texts` (style -> arm -> replies, default: `texts` for every style)
    when the replies differ per style (per-user adapters); with `phase_ends` the forgetting table and,
    when the history has them, the win rates against each phase's snapshot. `eval_prompts` and
    `relevance` (a RelevanceScorer): the relevance rule joins the degenerate-reply rule."""
    final = {}
    history_initial = initial_baseline(history)
    for style in styles:
        by_arm = {r["arm"]: r for r in history_initial if r["step"] == last_step and r["style"] == style}
        entry = {arm: {k: by_arm[arm][k] for k in FINAL_FIELDS} for arm in by_arm}
        if "placebo" in by_arm:
            entry["net_effect"] = net_effect(by_arm["feedback"], by_arm["placebo"])
        final[style] = entry
    paired = {}
    for style in styles:
        by_arm = (style_texts or {}).get(style, texts)
        if by_arm.get("feedback") and by_arm.get("placebo"):
            diff = paired_score_difference(style, by_arm["feedback"], by_arm["placebo"], baseline, eval_prompts,
                                           relevance)
            if diff is not None:
                paired[style] = diff
    collapse = collapse_summary(history, styles, last_step, baseline, eval_prompts, relevance)
    summary = {"headline": headline(styles, last_step, final, head_to_head, paired, collapse["degenerate_replies"]),
               "final_step": last_step, "baseline_mean_words": mean_words(baseline) if baseline else None,
               "final": final, "head_to_head_feedback_vs_placebo": head_to_head,
               "paired_style_score_feedback_minus_placebo": paired, **collapse,
               "output_dir": str(out), "winrate_png": str(out / "winrate.png")}
    if phase_ends:
        summary["forgetting"] = forgetting_table(history, styles, phase_ends)
    if any(r.get("baseline") == "snapshot" for r in history):
        summary["vs_phase_snapshot"] = snapshot_records(history)
    return summary


def headline(styles: list[str], last_step: int | None, final: dict, head_to_head: dict, paired: dict,
             degenerate: dict) -> dict:
    """Per style with both arms: the paired comparison of feedback and placebo on the same prompts (head to
    head, paired rule score, each with its SE), and beside it each arm's win rate against the baseline,
    the net effect and the degenerate replies of the final evaluation."""
    out = {}
    for style in styles:
        if style not in head_to_head and style not in paired:
            continue
        entry = final.get(style, {})
        out[style] = {"step": last_step, "head_to_head": head_to_head.get(style),
                      "paired_rule_score": paired.get(style),
                      "win_rate_vs_baseline": {arm: {k: entry[arm][k] for k in ("win_rate", "se", "mean_words")}
                                               for arm in ("feedback", "placebo") if arm in entry},
                      "net_effect": entry.get("net_effect"), "degenerate_replies": degenerate.get(style)}
    return out


def headline_text(summary: dict) -> list[str]:
    """The lines printed first: the arms compared on the same prompts, then the baseline comparisons."""
    lines = []
    for style, h in summary.get("headline", {}).items():
        count = (h["degenerate_replies"] or {}).get("n") or (h["head_to_head"] or {}).get("n")
        lines.append(f"== headline at step {h['step']} ({style}): feedback vs placebo, paired on the same "
                     f"{count} held-out prompts ==")
        if h["head_to_head"]:
            lines.append(f"head to head, feedback's replies vs placebo's (% won, ties excluded): "
                         f"{fmt_rate(h['head_to_head'])}")
        pair = h["paired_rule_score"]
        if pair:
            base = "" if pair.get("baseline_score") is None else f", baseline {pair['baseline_score']:.2f}"
            lines.append(f"paired rule score of '{style}', feedback - placebo: {pair['diff']:+.2f} +- {pair['se']:.2f} "
                         f"per reply (feedback {pair['feedback']:.2f}, placebo {pair['placebo']:.2f}{base}; higher "
                         "fits the style; a degenerate reply scores no higher than the worst sound one)")
        rates = ", ".join(f"{arm} {fmt_cell(r)}" for arm, r in h["win_rate_vs_baseline"].items())
        net = h["net_effect"]
        net_text = "" if net is None else "; net effect (feedback - placebo) " + (
            "n/a (no decisive pair in an arm)" if net["diff"] is None else
            f"{fmt_diff(net)} points")
        lines.append(f"beside it, win rate vs the baseline: {rates}{net_text}")
        counts = h["degenerate_replies"]
        if counts:
            arms = ", ".join(f"{arm} {counts[arm]}/{counts['n']}" for arm in ("feedback", "placebo") if arm in counts)
            lines.append(f"degenerate replies: baseline {counts['baseline']}/{counts['n']}, {arms}")
        lines.append("")
    return lines


def summary_text(summary: dict, history: list[dict], arms: list[str], styles: list[str], baseline: list[str],
                 texts: dict[str, list[str]], eval_prompts: list, out: Path) -> str:
    """The printed summary: table, net effects, head-to-head, paired scores, lengths, one example."""
    last_step, baseline_words = summary["final_step"], summary["baseline_mean_words"]
    lines = headline_text(summary) + [summary_table(history, arms, styles), ""]
    if summary.get("forgetting"):
        lines += [forgetting_text(summary["forgetting"], arms, styles), ""]
    for record in summary.get("vs_phase_snapshot", []):
        lines.append(f"phase {record['phase']} ({record['style']}, {record['arm']}) at step {record['step']} vs the "
                     f"policy at step {record['snapshot_step']}: {fmt_rate(record)}")
    if baseline_words is not None and last_step is not None:
        lines += collapse_text(summary, last_step)
        lines.append(f"mean words per eval reply: baseline {baseline_words:.1f}; at step {last_step}: " + ", ".join(
            f"{arm} {mean_words(texts[arm]):.1f}" for arm in arms if texts.get(arm)))
        lines.append(example_text(eval_prompts, baseline, texts, arms))
    lines.append(f"win-rate plot: {out / 'winrate.png'}")
    lines.append(f"results: {out}")
    return "\n".join(lines)


EXAMPLE_RULE = "the prompt with the median change in length (feedback minus baseline words; lower middle, then first)"


def example_index(baseline: list[str], replies: list[str]) -> int:
    """The prompt shown as the example, by a fixed rule (EXAMPLE_RULE) rather than the first prompt:
    typical of the run, neither its best nor its worst case."""
    changes = sorted((words(r) - words(b), i) for i, (b, r) in enumerate(zip(baseline, replies)))
    return changes[(len(changes) - 1) // 2][1] if changes else 0


def example_text(eval_prompts: list, baseline: list[str], texts: dict[str, list[str]], arms: list[str],
                 limit: int = 400) -> str:
    clip = lambda t: t if len(t) <= limit else t[:limit].rstrip() + " [...]"  # noqa: E731
    index = example_index(baseline, texts.get(arms[0]) or baseline)
    parts = [f"example eval prompt #{index} ({EXAMPLE_RULE}): {prompt_as_text(eval_prompts[index])}",
             f"  baseline: {clip(baseline[index])!r}"]
    parts += [f"  {arm}: {clip(texts[arm][index])!r}" for arm in arms if texts.get(arm)]
    return "\n".join(parts)


def debug_example_text(tokenizer, messages, reply, followup: str, signal, hindsight_template: str,
                       hindsight_placement: str = "last_user_message") -> str:
    """The first interaction in full: contexts x and xo, the reply, the follow-up, the signal per token."""
    from sdpo_objective import hindsight_messages, render_context_ids

    x = tokenizer.decode(render_context_ids(tokenizer, messages))
    xo = tokenizer.decode(render_context_ids(tokenizer, hindsight_messages(messages, followup, hindsight_template,
                                                                           hindsight_placement)))
    pieces = [tokenizer.decode([i]) for i in reply.ids]
    tokens = " ".join(f"{p!r}:{float(s):+.2f}" for p, s in zip(pieces, signal.tolist()))
    return (f"\n=== first interaction ===\n--- context x ---\n{x}\n--- context xo ---\n{xo}\n--- reply y ---\n"
            f"{reply.text}\n--- follow-up o ---\n{followup}\n--- signal A_t per reply token ---\n{tokens}\n")
