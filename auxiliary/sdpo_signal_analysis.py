"""Per-token SDPO signal under a relevant and an unrelated follow-up, with heatmaps.

For each case of a cases file the model samples one reply y to the prompt x (resampled, a
bounded number of times, until y has at least --min_tokens tokens). The SAME token ids of y
are then scored twice with sdpo_objective.compute_signal (the one implementation of the
signal): under the relevant follow-up o and under an unrelated one (e.g. "What is 27 times
4?"). A useful signal is near zero for the unrelated follow-up and structured for the
relevant one.

    python auxiliary/sdpo_signal_analysis.py --model smollm2-135m-instruct --n_cases 6 \
        --output_dir /tmp/signals

Cases file: a JSON list of objects with `id`, `tag` (reinforce | constrain), `prompt` (a
string; or `messages`, a role/content list ending with a user message), optional `system`,
`followup` and `unrelated_followup`.

Outputs in --output_dir:
    sdpo_signals.json   {"meta": {model, model_path, seed, generation, template, ..., summary},
                         "cases": [{id, tag, messages, completion_ids, tokens, followup,
                                    unrelated_followup, sig_follow, sig_unrel}]}
                        `template` is the hindsight block (a format string with {followup})
                        appended to the last user message of `messages`.
    unrelated.png, followup.png   heatmaps, one row per case, one column per reply token
    stacked.png                   each case as two adjacent rows (unrelated, relevant)
    side_by_side.png              the two heatmaps next to each other
    case{N}_tokens.png            the reply of case N (0-based position in `cases`) as text
                                  cells coloured by the signal, under both follow-ups
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from auxiliary.runtime.io_utils import DataError

logger = logging.getLogger("sdpo_signal_analysis")

TAGS = ("reinforce", "constrain")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = "auxiliary/signal_analysis_cases.json"


@dataclass
class SignalAnalysisArgs:
    model: str = field(default="Qwen/Qwen3-8B", metadata={
        "help": "hub id, local folder, smollm2-135m-instruct or tiny-random"})
    cases_json: str = field(default=DEFAULT_CASES, metadata={
        "help": "cases file (relative paths also tried from the repo root)"})
    n_cases: int = field(default=24, metadata={"help": "first N cases of the file (0 = all)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "default: $BASE_WORK/sdpo_outputs/signal_analysis_<time>"})
    seed: int = field(default=1234, metadata={"help": "sampling seed"})
    max_new_tokens: int = field(default=160, metadata={"help": "reply length limit"})
    min_tokens: int = field(default=24, metadata={"help": "resample replies shorter than this (tokens, EOS included)"})
    max_tries: int = field(default=5, metadata={
        "help": "samples per case at most; the longest is kept if none is long enough"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy, no resampling)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    hindsight_template: Optional[str] = field(default=None, metadata={
        "help": "hindsight block with {followup} (default: sdpo_objective's)"})
    max_context_length: Optional[int] = field(default=None, metadata={
        "help": "cut contexts from the left to this many tokens (default: no cut)"})
    batch_size: int = field(default=8, metadata={"help": "cases per generate / scoring call"})
    from_json: Optional[str] = field(default=None, metadata={
        "help": "redraw figures and summary from an existing sdpo_signals.json (no model)"})
    token_plot_cases: str = field(default="all", metadata={
        "help": "cases that get case{N}_tokens.png: all, none, or indices like 0,3,5"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, eager, flash_attention_2"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})

    def __post_init__(self):
        from auxiliary.runtime.option_groups import check_ranges

        check_ranges(self)  # --n_cases -1 used to run 23 cases silently


# --------------------------------------------------------------------------- cases

def resolve_cases_path(path: str) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.exists() and not candidate.is_absolute() and (REPO_ROOT / candidate).exists():
        candidate = REPO_ROOT / candidate
    if not candidate.exists():
        raise DataError(f"{path}: cases file not found")
    return candidate


def load_cases(path: str | os.PathLike, n_cases: int | None = None) -> list[dict]:
    """Validated cases: {id, tag, messages, followup, unrelated_followup}; errors name file, case and field."""
    from sdpo_objective import normalize_messages

    path = resolve_cases_path(str(path))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON list of cases")
    cases, seen = [], set()
    for index, case in enumerate(raw):
        where = f"{path}: case {index}"
        if not isinstance(case, dict):
            raise DataError(f"{where}: expected an object, got {type(case).__name__}")
        case_id = str(case.get("id", index))
        where = f"{path}: case {index} (id {case_id!r})"
        if case_id in seen:
            raise DataError(f"{where}: duplicate id")
        seen.add(case_id)
        if case.get("tag") not in TAGS:
            raise DataError(f"{where}: field 'tag' must be one of {', '.join(TAGS)}, got {case.get('tag')!r}")
        for key in ("followup", "unrelated_followup"):
            if not isinstance(case.get(key), str) or not case[key].strip():
                raise DataError(f"{where}: field '{key}' must be a non-empty string")
        if isinstance(case.get("prompt"), str) and case["prompt"].strip():
            messages = [{"role": "user", "content": case["prompt"]}]
        elif isinstance(case.get("messages"), list) and case["messages"]:
            try:
                messages = normalize_messages(case["messages"])
            except ValueError as err:
                raise DataError(f"{where}: field 'messages': {err}") from None
            if messages[-1]["role"] != "user":
                raise DataError(f"{where}: field 'messages' must end with a user message")
        else:
            raise DataError(f"{where}: needs a non-empty string 'prompt' or a message list 'messages'")
        if case.get("system"):
            messages = ([{"role": "system", "content": str(case["system"])}]
                        + [m for m in messages if m["role"] != "system"])
        cases.append({"id": case_id, "tag": case["tag"], "messages": messages, "followup": case["followup"].strip(),
                      "unrelated_followup": case["unrelated_followup"].strip()})
    if n_cases:
        if n_cases > len(cases):
            logger.warning("%s holds %d cases; --n_cases %d clamped", path, len(cases), n_cases)
        cases = cases[:n_cases]
    return cases


# --------------------------------------------------------------------------- sampling and scoring

def sample_replies(model, tokenizer, conversations: list[list[dict]],
                   args: SignalAnalysisArgs) -> tuple[list, list[int]]:
    """One reply per conversation; short replies are resampled (new seed each round), the longest kept."""
    from auxiliary.runtime.generation import generate_responses

    best: list = [None] * len(conversations)
    tries = [0] * len(conversations)
    pending = list(range(len(conversations)))
    rounds = args.max_tries if args.temperature > 0 else 1  # greedy decoding gives the same reply again
    for attempt in range(rounds):
        if not pending:
            break
        replies = generate_responses(model, tokenizer, [conversations[i] for i in pending],
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, batch_size=args.batch_size,
                                     max_context_length=args.max_context_length, seed=args.seed + 1000 * attempt,
                                     progress=True, desc=f"sample replies (round {attempt + 1})")
        still_short = []
        for index, reply in zip(pending, replies):
            tries[index] += 1
            if best[index] is None or len(reply.ids) > len(best[index].ids):
                best[index] = reply
            if len(reply.ids) < args.min_tokens:
                still_short.append(index)
        pending = still_short
    for index in pending:
        logger.warning("case %d: no reply reached %d tokens in %d tries; keeping the longest (%d tokens)",
                       index, args.min_tokens, tries[index], len(best[index].ids))
    return best, tries


def score_followups(model, tokenizer, conversations, replies_ids, followups, template: str, batch_size: int,
                    max_context_length: int | None) -> list[list[float]]:
    """Signal per reply token under one follow-up per case, through sdpo_objective.compute_signal."""
    from sdpo_objective import compute_signal, hindsight_messages, render_context_ids

    signals: list[list[float]] = []
    for start in range(0, len(conversations), batch_size):
        chunk = slice(start, start + batch_size)
        contexts_x = [render_context_ids(tokenizer, conv) for conv in conversations[chunk]]
        contexts_xo = [render_context_ids(tokenizer, hindsight_messages(conv, followup, template))
                       for conv, followup in zip(conversations[chunk], followups[chunk])]
        results = compute_signal(model, contexts_x, contexts_xo, replies_ids[chunk], tokenizer.pad_token_id,
                                 max_context_length=max_context_length)
        signals.extend(result["signal"] for result in results)
    return signals


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded on its own (special tokens kept visible), so that tokens[i] pairs with ids[i]."""
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]


# --------------------------------------------------------------------------- summary

def summarize(cases: list[dict]) -> dict:
    """Token-weighted mean |signal| (and mean signal) under both follow-ups, overall and per tag."""
    import numpy as np

    groups = {"all": cases}
    for tag in TAGS:
        groups[tag] = [c for c in cases if c["tag"] == tag]
    summary = {}
    for name, members in groups.items():
        if not members:
            continue
        unrel = np.concatenate([np.asarray(c["sig_unrel"], dtype=float) for c in members])
        follow = np.concatenate([np.asarray(c["sig_follow"], dtype=float) for c in members])
        mean_abs_unrel, mean_abs_follow = float(np.abs(unrel).mean()), float(np.abs(follow).mean())
        summary[name] = {
            "n_cases": len(members), "n_tokens": int(unrel.size),
            "mean_abs_unrelated": mean_abs_unrel, "mean_abs_followup": mean_abs_follow,
            "mean_unrelated": float(unrel.mean()), "mean_followup": float(follow.mean()),
            "ratio_abs_followup_to_unrelated": mean_abs_follow / mean_abs_unrel if mean_abs_unrel > 0 else None,
            # the part owed to WHAT the follow-up says (a generic "any hindsight block" shift cancels out)
            "mean_abs_difference": float(np.abs(follow - unrel).mean()),
            "mean_case_correlation": _mean_correlation(members),
        }
    return summary


def _mean_correlation(cases: list[dict]) -> float | None:
    """Mean over cases of the Pearson correlation between the two signals of a reply (None if undefined)."""
    import numpy as np

    values = []
    for case in cases:
        a, b = np.asarray(case["sig_follow"], dtype=float), np.asarray(case["sig_unrel"], dtype=float)
        if a.size > 1 and a.std() > 0 and b.std() > 0:
            values.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(values)) if values else None


def format_summary(summary: dict) -> str:
    header = f"{'cases':<12}{'n':>4}{'tokens':>8}{'mean|A| unrel':>15}{'mean|A| follow':>16}{'ratio':>7}" \
             f"{'mean A unrel':>14}{'mean A follow':>15}{'mean|diff|':>12}{'corr':>7}"
    lines = [header, "-" * len(header)]
    for name, row in summary.items():
        ratio = row["ratio_abs_followup_to_unrelated"]
        corr = row["mean_case_correlation"]
        lines.append(f"{name:<12}{row['n_cases']:>4}{row['n_tokens']:>8}{row['mean_abs_unrelated']:>15.4f}"
                     f"{row['mean_abs_followup']:>16.4f}{(f'{ratio:.2f}' if ratio else '-'):>7}"
                     f"{row['mean_unrelated']:>14.4f}{row['mean_followup']:>15.4f}{row['mean_abs_difference']:>12.4f}"
                     f"{(f'{corr:.2f}' if corr is not None else '-'):>7}")
    lines.append("mean|diff| = mean |A_follow - A_unrel| per token (what the follow-up's content adds); "
                 "corr = mean per-reply correlation of the two signals")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def token_plot_indices(spec: str, n_cases: int) -> list[int]:
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n_cases))
    if spec in ("", "none"):
        return []
    try:
        indices = [int(part) for part in spec.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--token_plot_cases must be all, none or case indices like 0,3; got {spec!r}") from None
    bad = [i for i in indices if not 0 <= i < n_cases]
    if bad:
        raise ValueError(f"--token_plot_cases: indices {bad} out of range for {n_cases} cases")
    return indices


def write_plots(cases: list[dict], output_dir: Path, summary: dict, token_plot_cases: str) -> list[str]:
    from auxiliary.evals import signal_plots as plots

    labels = [f"{c['id']} ({c['tag']})" for c in cases]
    unrel = [c["sig_unrel"] for c in cases]
    follow = [c["sig_follow"] for c in cases]
    vmax = plots.shared_scale(unrel + follow)
    written = [
        plots.plot_heatmap(unrel, labels, output_dir / "unrelated.png", vmax,
                           "Per-token signal under an UNRELATED follow-up (mean |A| = "
                           f"{summary['all']['mean_abs_unrelated']:.3f})"),
        plots.plot_heatmap(follow, labels, output_dir / "followup.png", vmax,
                           "Per-token signal under the RELEVANT follow-up (mean |A| = "
                           f"{summary['all']['mean_abs_followup']:.3f})"),
        plots.plot_stacked(unrel, follow, labels, output_dir / "stacked.png", vmax),
        plots.plot_side_by_side(unrel, follow, labels, output_dir / "side_by_side.png", vmax, summary["all"]),
    ]
    for index in token_plot_indices(token_plot_cases, len(cases)):
        case = cases[index]
        prompt = case["messages"][-1]["content"]
        panels = [(f"Unrelated follow-up: {case['unrelated_followup']}", case["sig_unrel"]),
                  (f"Relevant follow-up: {case['followup']}", case["sig_follow"])]
        written.append(plots.plot_case_tokens(case["tokens"], panels, output_dir / f"case{index}_tokens.png", vmax,
                                              f"case {index} {case['id']} ({case['tag']}). Prompt: {prompt}"))
    return written


# --------------------------------------------------------------------------- main

def replot(args: SignalAnalysisArgs) -> Path:
    """Figures and summary again from a written sdpo_signals.json (e.g. after changing the plot code)."""
    source = Path(args.from_json)
    if not source.exists():
        raise DataError(f"{source}: file not found")
    data = json.loads(source.read_text(encoding="utf-8"))
    output_dir = Path(args.output_dir) if args.output_dir else source.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(data["cases"])
    write_plots(data["cases"], output_dir, summary, args.token_plot_cases)
    print(format_summary(summary))
    print(f"\nfigures in {output_dir}")
    return source


def run(args: SignalAnalysisArgs) -> Path:
    """Sample, score, write sdpo_signals.json and the figures; returns the JSON path."""
    from auxiliary.evals.eval_common import default_output_dir
    from auxiliary.runtime.io_utils import atomic_write_json, require_writable_folder
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE, check_lm_head, validate_template

    template = validate_template(args.hindsight_template or DEFAULT_HINDSIGHT_TEMPLATE)
    if args.min_tokens > args.max_new_tokens:
        raise ValueError(f"--min_tokens {args.min_tokens} exceeds --max_new_tokens {args.max_new_tokens}")
    if args.max_tries < 1:
        raise ValueError("--max_tries must be >= 1")
    cases = load_cases(args.cases_json, args.n_cases)
    token_plot_indices(args.token_plot_cases, len(cases))  # fail on a bad spec before any model work
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir("signal_analysis")
    require_writable_folder(output_dir)  # created with sdpo_signals.json: a failed load leaves no empty folder

    started = time.time()
    model, tokenizer, model_path = load_model_and_tokenizer(args.model, args.dtype, args.attn_implementation,
                                                            args.device)
    check_lm_head(model)  # the chunked head must reproduce the model's own logits
    loaded = time.time()
    conversations = [case["messages"] for case in cases]
    replies, tries = sample_replies(model, tokenizer, conversations, args)
    sampled = time.time()
    reply_ids = [reply.ids for reply in replies]
    sig_follow = score_followups(model, tokenizer, conversations, reply_ids, [c["followup"] for c in cases],
                                 template, args.batch_size, args.max_context_length)
    sig_unrel = score_followups(model, tokenizer, conversations, reply_ids, [c["unrelated_followup"] for c in cases],
                                template, args.batch_size, args.max_context_length)
    scored = time.time()

    records = []
    for case, reply, follow, unrel in zip(cases, replies, sig_follow, sig_unrel):
        records.append({"id": case["id"], "tag": case["tag"], "messages": case["messages"],
                        "completion_ids": [int(t) for t in reply.ids], "tokens": token_strings(tokenizer, reply.ids),
                        "followup": case["followup"], "unrelated_followup": case["unrelated_followup"],
                        "sig_follow": [float(v) for v in follow], "sig_unrel": [float(v) for v in unrel]})
    summary = summarize(records)
    meta = {
        "model": args.model, "model_path": model_path, "seed": args.seed,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "template": template,
        "generation": {"max_new_tokens": args.max_new_tokens, "min_tokens": args.min_tokens,
                       "max_tries": args.max_tries, "temperature": args.temperature, "top_p": args.top_p,
                       "tries_per_case": tries},
        "max_context_length": args.max_context_length,
        "cases_json": str(resolve_cases_path(args.cases_json)), "n_cases": len(records),
        "summary": summary,
        "seconds": {"load": round(loaded - started, 2), "sample": round(sampled - loaded, 2),
                    "score": round(scored - sampled, 2)},
        "args": asdict(args),
    }
    json_path = output_dir / "sdpo_signals.json"
    atomic_write_json(json_path, {"meta": meta, "cases": records})
    write_plots(records, output_dir, summary, args.token_plot_cases)
    print(f"\nmodel {args.model} | {len(records)} cases | {sum(len(r['completion_ids']) for r in records)} reply tokens"
          f" | sample {sampled - loaded:.1f}s, score {scored - sampled:.1f}s, plots {time.time() - scored:.1f}s")
    print(format_summary(summary))
    print(f"\nwrote {json_path} and figures in {output_dir}")
    return json_path


def main(argv: list[str] | None = None) -> int:
    from auxiliary.runtime.cli import run_cli

    return run_cli(SignalAnalysisArgs, lambda args: replot(args) if args.from_json else run(args), argv,
                   prog="sdpo_signal_analysis.py")


if __name__ == "__main__":
    sys.exit(main())
