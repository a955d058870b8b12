"""Prompts, win-rate metrics and the win-rate plot of the online evaluation.

Prompts
    A prompt is either a string (one user message) or a conversation: a list of
    {"role", "content"} messages ending with a user message.
    prompt_as_messages(prompt) -> list[dict]   what the policy generates from
    prompt_as_text(prompt) -> str              what simulated users and judges read
    load_prompts(path, n=None, seed=0, tokenizer=None, max_prompt_tokens=None) -> (prompts, dropped)
        JSONL lines with `prompt` (a string or a message list) or `messages` (a message list;
        role/content or from/value). Bad lines raise DataError naming file:line and field.
        With a tokenizer and max_prompt_tokens, prompts whose chat-templated length (generation
        prompt included) exceeds the limit are dropped and counted. The rest are shuffled with
        `seed` and the first n kept; n larger than the data is clamped with a warning.

Metrics (decisions come from PairwiseJudge.compare: "A" = the evaluated policy wins,
"B" = the baseline wins, "C" = tie)
    win_rate_stats(decisions, n_bootstrap=10000, seed=0) -> dict with
        n, wins, losses, ties
        coverage      = (wins + losses) / n, the fraction of decisive pairs (0..1)
        win_rate      = 100 * wins / (wins + losses)                 (ties excluded)
        se            = 100 * sqrt(p (1 - p) / (wins + losses))      (analytic, p = win_rate / 100)
        n_effective   = wins + losses, the decisive pairs
        winrate_inc_ties = 100 * (wins + ties / 2) / n                (a tie counts half; None when n = 0)
        se_bootstrap  = standard deviation (ddof=1) of the win rate over n_bootstrap resamples of the
                        decisive pairs only, drawn with replacement (the paper repository's SE),
                        numpy Generator seeded with `seed`
        se_bootstrap_all = the same over resamples of all n decisions (ties included in the
                        resampling; a resample with no decisive pair is skipped)
        win_rate, se, se_bootstrap and se_bootstrap_all are None when no pair is decisive.
    net_effect(feedback_stats, placebo_stats) -> {"diff", "se"}
        diff = win_rate(feedback) - win_rate(placebo), se = sqrt(se_f^2 + se_p^2) (analytic SEs,
        independent samples); both None when either win rate is None.
    plot_win_rates(history_records, path, boundaries=(), reference=None) -> path   (win_rate_figure)
        win rate vs interaction step, one colour per arm and one line style per style, a +-SE band,
        undefined win rates drawn as an x on the 50% line, a dashed vertical line at each phase
        boundary of a style schedule; below it words per reply and degenerate replies per arm and
        eval step (the baseline's as `reference`); integer steps; written atomically.
"""
from __future__ import annotations

import io
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from auxiliary.runtime.io_utils import DataError, atomic_write_bytes, iter_jsonl

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_data_file(path: str) -> Path:
    """As given, else relative to the repository (so the defaults work from any directory). A relative
    path that exists both here and in the repository is taken from here, with a warning naming both."""
    candidate = Path(path).expanduser()
    in_repo = REPO_ROOT / path
    if candidate.exists() or candidate.is_absolute():
        if not candidate.is_absolute() and in_repo.exists() and in_repo.resolve() != candidate.resolve():
            logger.warning("%s: taken from the current folder (%s), not from the repository (%s)", path,
                           candidate.resolve(), in_repo)
        return candidate
    return in_repo if in_repo.exists() else candidate


def require_prompt_file(path: str, flag: str) -> Path:
    """find_data_file, or DataError naming the flag and where to get prompts (before any output is written)."""
    found = find_data_file(path)
    if not found.is_file():
        raise DataError(f"--{flag} {path}: file not found, neither in the current folder nor in the repository. "
                        "scripts/prepare_data.sh writes data/helpsteer_prompts/ and data/tldr_prompts_unique/ "
                        "(from the hub); the bundled prompts need no download: --train_jsonl data/samples/train.jsonl "
                        "--val_jsonl data/samples/validation.jsonl")
    return found

Prompt = Union[str, list]
DECISIONS = ("A", "B", "C")


# --------------------------------------------------------------------------- prompts

def prompt_as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def prompt_as_text(prompt: Prompt) -> str:
    """The request as a reader sees it; earlier turns of a conversation are labelled."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def _parse_prompt(record: dict, where: str) -> Prompt:
    from sdpo_objective import normalize_messages

    if "prompt" in record:
        field, value = "prompt", record["prompt"]
    elif "messages" in record:
        field, value = "messages", record["messages"]
    else:
        raise DataError(f"{where}: missing field 'prompt' (a string or a message list) or 'messages'; "
                        f"found keys {sorted(record)}")
    if isinstance(value, str):
        if field == "messages":
            raise DataError(f"{where}: field 'messages' must be a list of messages, got a string")
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return value
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty string or message list, "
                        f"got {type(value).__name__}")
    try:
        messages = normalize_messages(value)
    except ValueError as err:
        raise DataError(f"{where}: field '{field}': {err}") from None
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: field '{field}' must end with a user message, ends with "
                        f"{messages[-1]['role']!r}")
    return messages


def load_prompts(path: str | os.PathLike, n: int | None = None, seed: int = 0, tokenizer=None,
                 max_prompt_tokens: int | None = None) -> tuple[list[Prompt], int]:
    """Returns (prompts, dropped_count); see the module docstring."""
    prompts = [_parse_prompt(record, f"{path}:{line}") for line, record in iter_jsonl(path)]
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    dropped = 0
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("load_prompts: max_prompt_tokens needs a tokenizer")
        from sdpo_objective import render_context_ids

        kept = [p for p in prompts if len(render_context_ids(tokenizer, prompt_as_messages(p))) <= max_prompt_tokens]
        dropped = len(prompts) - len(kept)
        prompts = kept
        if dropped:
            logger.info("%s: dropped %d prompts longer than %d tokens", path, dropped, max_prompt_tokens)
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    if n is not None:
        if n < 0:
            raise ValueError(f"load_prompts: n must be >= 0, got {n}")
        if n > len(prompts):
            logger.warning("%s: asked for %d prompts, only %d available%s; using %d", path, n, len(prompts),
                           f" after dropping {dropped} over {max_prompt_tokens} tokens" if dropped else "",
                           len(prompts))
        prompts = prompts[:n]
    return prompts, dropped


# --------------------------------------------------------------------------- metrics

# Below this many decisive pairs a win rate has no standard error worth printing: one win and no loss would
# show "100.0 +- 0.0". `se` and `se_bootstrap` are then None and the reports say "SE undefined".
MIN_DECISIVE_FOR_SE = 5


def win_rate_stats(decisions: Sequence[str], n_bootstrap: int = 10000, seed: int = 0) -> dict:
    bad = [d for d in decisions if d not in DECISIONS]
    if bad:
        raise ValueError(f"decisions must be 'A', 'B' or 'C'; got {bad[:5]!r}")
    counts = Counter(decisions)
    n, wins, losses, ties = len(decisions), counts["A"], counts["B"], counts["C"]
    decisive = wins + losses
    stats = {"n": n, "wins": wins, "losses": losses, "ties": ties, "n_effective": decisive,
             "coverage": decisive / n if n else 0.0, "win_rate": None, "se": None, "se_bootstrap": None,
             "se_bootstrap_all": None, "winrate_inc_ties": 100.0 * (wins + ties / 2) / n if n else None}
    if decisive == 0:
        return stats
    p = wins / decisive
    stats["win_rate"] = 100.0 * p
    if decisive >= MIN_DECISIVE_FOR_SE:
        stats["se"] = 100.0 * math.sqrt(p * (1.0 - p) / decisive)
        stats["se_bootstrap"] = bootstrap_se(wins, losses, 0, n_bootstrap, seed)  # the paper's: decisive pairs only
    stats["se_bootstrap_all"] = bootstrap_se(wins, losses, ties, n_bootstrap, seed)
    return stats


def bootstrap_se(wins: int, losses: int, ties: int, n_bootstrap: int = 10000, seed: int = 0) -> float | None:
    """SE of the win rate over resamples of the n decisions with replacement. Counting how often each
    outcome is drawn in a resample of size n is a multinomial draw, so the whole bootstrap is one
    vectorised call instead of n_bootstrap x n index draws."""
    n = wins + losses + ties
    if n == 0 or wins + losses == 0 or n_bootstrap < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [wins / n, losses / n, ties / n], size=n_bootstrap)
    decisive = draws[:, 0] + draws[:, 1]
    valid = decisive > 0
    if valid.sum() < 2:
        return None
    rates = 100.0 * draws[valid, 0] / decisive[valid]
    return float(np.std(rates, ddof=1))


def net_effect(feedback_stats: dict, placebo_stats: dict) -> dict:
    wf, wp = feedback_stats.get("win_rate"), placebo_stats.get("win_rate")
    if wf is None or wp is None:
        return {"diff": None, "se": None}
    se_f, se_p = feedback_stats.get("se"), placebo_stats.get("se")
    if se_f is None or se_p is None:  # an arm under MIN_DECISIVE_FOR_SE decisive pairs
        return {"diff": wf - wp, "se": None}
    return {"diff": wf - wp, "se": math.sqrt(se_f ** 2 + se_p ** 2)}


# --------------------------------------------------------------------------- plot

ARM_COLOURS = {"feedback": "tab:blue", "placebo": "tab:orange"}
_OTHER_COLOURS = ["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
_STYLE_LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
UNDEFINED_LABEL = "win rate undefined (no decisive pair)"
SE_UNDEFINED_LABEL = f"SE undefined (under {MIN_DECISIVE_FOR_SE} decisive pairs)"
# distinct markers and widths, so that two arms with equal win rates both stay visible
_ARM_MARKERS = {"feedback": ("o", 6, 2.2), "placebo": ("s", 4, 1.2)}
# the degenerate-reply bars of one eval step span this share of the smallest gap between eval steps: narrow,
# whether a run has two eval steps or twenty
BAR_GROUP_SHARE = 0.2


def win_rate_figure(history_records: Sequence[dict], title: str | None = None, boundaries: Sequence[int] = (),
                    reference: dict | None = None):
    """The win-rate figure (a matplotlib Figure; Agg, no display). Top panel: win rate vs the baseline per
    eval step, one colour per arm (ARM_COLOURS; one per style for records without an arm), one line style
    per style, a +-1 SE band; a point whose win rate is undefined (no decisive pair) is drawn as an x on
    the 50% line, not left out, and one whose SE is undefined (under MIN_DECISIVE_FOR_SE decisive pairs) has
    a hollow ring round it and no band. Bottom panel, when the records carry `mean_words`: words per reply
    (lines, left axis) and degenerate replies (`monitors.degenerate_replies`, bars, right axis) per arm
    and eval step (one record per arm and step: the first style's); `reference` ({"mean_words",
    "degenerate_replies", "n"}) is the baseline's, drawn as a grey line. `boundaries`: steps after which
    the user's style changed, drawn as vertical lines. Steps are integers on the x axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series: dict[tuple[str, str | None], list[dict]] = {}
    for record in history_records:
        series.setdefault((record["style"], record.get("arm")), []).append(record)
    styles = list(dict.fromkeys(style for style, _ in sorted(series)))
    arms = list(dict.fromkeys(arm for _, arm in sorted(series, key=lambda k: (k[1] not in ARM_COLOURS, str(k[1])))))
    others = iter(_OTHER_COLOURS * 4)
    colours = {arm: ARM_COLOURS.get(arm) or next(others) for arm in arms if arm is not None}
    style_colours = {style: f"C{i % 10}" for i, style in enumerate(styles)}
    linestyles = {style: _STYLE_LINESTYLES[i % len(_STYLE_LINESTYLES)] for i, style in enumerate(styles)}
    lower = any("mean_words" in r for r in history_records)

    fig = Figure(figsize=(7.5, 6.6 if lower else 4.2))
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]}) if lower else [fig.subplots()]
    ax = axes[0]
    ax.axhline(50.0, color="grey", linewidth=1, linestyle=":", label="50% (no change)")
    for index, step in enumerate(boundaries):
        for axis in axes:
            axis.axvline(step, color="black", linewidth=1, linestyle="--", alpha=0.6,
                         label="phase boundary" if index == 0 and axis is ax else None)
    labelled: set[str] = set()
    for (style, arm), records in sorted(series.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        records = sorted(records, key=lambda r: r["step"])
        colour = colours[arm] if arm is not None else style_colours[style]
        steps = np.array([r["step"] for r in records], dtype=float)
        rates = np.array([np.nan if r.get("win_rate") is None else r["win_rate"] for r in records], dtype=float)
        errors = np.array([np.nan if r.get("se") is None else r["se"] for r in records], dtype=float)
        label = (style if arm is None else arm) if len(styles) == 1 or arm is None else f"{arm} ({style})"
        marker, size, width = _ARM_MARKERS.get(arm, ("o", 4, 1.5))
        ax.plot(steps, rates, marker=marker, markersize=size, linewidth=width, color=colour,
                linestyle=linestyles[style], label=label)
        ax.fill_between(steps, rates - errors, rates + errors, color=colour, alpha=0.15, linewidth=0)
        undefined = np.isnan(rates)
        if undefined.any():
            ax.plot(steps[undefined], np.full(int(undefined.sum()), 50.0), linestyle="none", marker="x", markersize=9,
                    markeredgewidth=2, color=colour, label=None if UNDEFINED_LABEL in labelled else UNDEFINED_LABEL)
            labelled.add(UNDEFINED_LABEL)
        no_se = ~undefined & np.isnan(errors)
        if no_se.any():  # a rate from a few decisive pairs: a hollow ring round its point, no band
            ax.plot(steps[no_se], rates[no_se], linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                    markeredgewidth=1.5, color=colour,
                    label=None if SE_UNDEFINED_LABEL in labelled else SE_UNDEFINED_LABEL)
            labelled.add(SE_UNDEFINED_LABEL)
    ax.set_ylabel("win rate vs baseline (%)")
    ax.set_ylim(-4, 104)  # a point at 0% or 100% (a ring round it) stays inside
    ax.set_title(title or "Style win rate (ties excluded), band = +-1 SE", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if lower:
        _words_and_degenerate_panel(axes[1], history_records, styles, colours, style_colours, reference)
    axes[-1].set_xlabel("interaction step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _words_and_degenerate_panel(ax, records: Sequence[dict], styles: list[str], colours: dict, style_colours: dict,
                                reference: dict | None) -> None:
    from matplotlib.ticker import MaxNLocator

    first_style = {}
    for record in records:  # one record per arm and step: the replies are the arm's, whatever the style
        key = (record.get("arm"), record["step"])
        if "mean_words" in record and (key not in first_style or styles.index(record["style"]) <
                                       styles.index(first_style[key]["style"])):
            first_style[key] = record
    arms = list(dict.fromkeys(arm for arm, _ in sorted(first_style, key=lambda k: (str(k[0]), k[1]))))
    steps_all = sorted({step for _, step in first_style})
    gap = float(np.diff(steps_all).min()) if len(steps_all) > 1 else 1.0  # the smallest gap between eval steps
    width = BAR_GROUP_SHARE * gap / max(1, len(arms))  # one bar per arm, side by side, the group centred on its step
    bars = ax.twinx()
    most_words, most_degenerate = (reference or {}).get("mean_words") or 0.0, 0
    for index, arm in enumerate(arms):
        chosen = sorted((r for (a, _), r in first_style.items() if a == arm), key=lambda r: r["step"])
        colour = colours[arm] if arm is not None else style_colours[chosen[0]["style"]]
        steps = np.array([r["step"] for r in chosen], dtype=float)
        marker, size, line_width = _ARM_MARKERS.get(arm, ("o", 4, 1.5))
        ax.plot(steps, [r["mean_words"] for r in chosen], marker=marker, markersize=size, linewidth=line_width,
                color=colour, label=f"{arm or chosen[0]['style']}: words per reply")
        most_words = max([most_words] + [r["mean_words"] for r in chosen])
        counts = [(r.get("monitors") or {}).get("degenerate_replies") for r in chosen]
        most_degenerate = max([most_degenerate] + [c for c in counts if c is not None])
        known = [(s, c) for s, c in zip(steps, counts) if c is not None]
        if known:
            offset = (index - (len(arms) - 1) / 2) * width
            bars.bar([s + offset for s, _ in known], [c for _, c in known], width=width, color=colour, alpha=0.35,
                     hatch="//", edgecolor=colour, label=f"{arm or chosen[0]['style']}: degenerate replies")
    if reference and reference.get("mean_words") is not None:
        degenerate = reference.get("degenerate_replies")
        extra = "" if degenerate is None else f"; {degenerate}/{reference.get('n')} degenerate"
        ax.axhline(reference["mean_words"], color="grey", linewidth=1.2, linestyle=":",
                   label=f"baseline: {reference['mean_words']:.1f} words{extra}")
    ax.set_ylabel("words per reply (lines)")
    ax.set_ylim(0, 1.25 * most_words or 1.0)  # headroom for the legend
    bars.set_ylabel("degenerate replies (bars)")
    bars.set_ylim(0, max(2, most_degenerate + 1, (reference or {}).get("degenerate_replies") or 0))
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(steps_all[0] - 0.45 * gap, steps_all[-1] + 0.45 * gap)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = bars.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="best")


def plot_win_rates(history_records: Sequence[dict], path: str | os.PathLike, title: str | None = None,
                   boundaries: Sequence[int] = (), reference: dict | None = None) -> str:
    """win_rate_figure written to `path` (temporary file, fsync, rename)."""
    path = Path(path)
    fig = win_rate_figure(history_records, title, boundaries, reference)
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip(".") or "png", dpi=120)
    atomic_write_bytes(path, image.getvalue())
    return str(path)


def load_run_prompts(train_jsonl, train_n: int, val_jsonl, eval_n: int, seed: int, tokenizer, max_prompt_tokens,
                     logger) -> tuple[list, list, dict]:
    """The online run's training and evaluation prompts (seeds `seed` and `seed + 1`) and what was
    dropped; DataError when every prompt of a file is too long (a run of zero steps would look like a
    success); `logger` (the run's) warns about clamped counts and dropped prompts."""
    train, dropped_train = load_prompts(find_data_file(train_jsonl), n=train_n, seed=seed, tokenizer=tokenizer,
                                        max_prompt_tokens=max_prompt_tokens)
    held_out, dropped_eval = (([], 0) if eval_n == 0 else
                              load_prompts(find_data_file(val_jsonl), n=eval_n, seed=seed + 1, tokenizer=tokenizer,
                                           max_prompt_tokens=max_prompt_tokens))
    logger.info("prompts: %d for training from %s, %d held out from %s", len(train),
                find_data_file(train_jsonl).resolve(), len(held_out), find_data_file(val_jsonl).resolve())
    for path, asked, kept, dropped in ((train_jsonl, train_n, train, dropped_train),
                                       (val_jsonl, eval_n, held_out, dropped_eval)):
        if asked and not kept:
            raise DataError(f"{path}: all {dropped} prompts are longer than --max_prompt_tokens {max_prompt_tokens}")
    for name, asked, got in (("train_n", train_n, len(train)), ("eval_n", eval_n, len(held_out))):
        if got < asked:
            logger.warning("--%s %d is more than the usable data: clamped to %d", name, asked, got)
    if dropped_train or dropped_eval:
        logger.warning("dropped prompts over max_prompt_tokens=%s: %d train, %d eval", max_prompt_tokens,
                       dropped_train, dropped_eval)
    info = {"train_prompts": len(train), "eval_prompts": len(held_out),
            "dropped_train_over_max_prompt_tokens": dropped_train, "dropped_eval_over_max_prompt_tokens": dropped_eval}
    return train, held_out, info
