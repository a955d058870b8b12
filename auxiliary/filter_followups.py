"""Drop logged interactions whose follow-up tells the model little about its reply (beyond the paper).

A follow-up that is a new request ("Now tell me a joke") rather than a reaction to the reply
("Too long, be concise") should barely change how likely the reply is: its SDPO signal
log p(y|x,o) - log p(y|x) is small everywhere. This script scores every (x, y, o) of an
interactions JSONL by the mean |signal| per reply token under a model (the one you will train;
sdpo_objective.compute_signal, the trainer's own tokens: SDPOCollator.encode, EOS included) and
keeps the records at or above --min_signal, unchanged, in their input order.

    python auxiliary/filter_followups.py --input_jsonl data/wildfeedback/wildfeedback_interactions.jsonl \
        --output_jsonl data/wildfeedback/informative.jsonl --base_model Qwen/Qwen3-4B --min_signal 0.05

--min_signal 0 (the default) drops nothing and only reports the scores' spread, to choose a
threshold from. Records the trainer would skip (an empty completion or follow-up) are dropped and
counted; a malformed record stops the run with its file and line, before anything is written.
Next to the output: <output>.summary.json (the counts and the threshold) and, with
--scores_jsonl, one {"line", "signal_abs_mean", "kept"} per scored record.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from auxiliary.runtime.option_groups import ContextOptions, ModelOptions, check_ranges, override
from offline_sdpo.main_offline_sdpo import OfflineTrainingArguments


@dataclass
class FilterFollowupsArgs(ContextOptions):
    input_jsonl: Optional[str] = field(default=None, metadata={
        "help": "interactions JSONL: prompt, completion, user_response (required)"})
    output_jsonl: Optional[str] = field(default=None, metadata={"help": "the kept records, unchanged (required)"})
    model: Optional[str] = override(ModelOptions, "model", None,
                                    help="scoring model, best the one you will train (required)")
    dtype: str = override(ModelOptions, "dtype", ModelOptions.dtype)
    attn_implementation: str = override(ModelOptions, "attn_implementation", ModelOptions.attn_implementation)
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda, cpu"})
    min_signal: float = field(default=0.0, metadata={
        "help": "keep records whose mean |signal| per reply token is at least this (0 = keep all)"})
    batch_size: int = field(default=8, metadata={"help": "records scored per forward pass"})
    # the trainer's cuts, so that the score is of the tokens it will train on
    max_context_length: int = override(ContextOptions, "max_context_length",
                                       OfflineTrainingArguments.max_context_length)
    max_completion_length: int = override(OfflineTrainingArguments, "max_completion_length",
                                          OfflineTrainingArguments.max_completion_length)
    scores_jsonl: Optional[str] = field(default=None, metadata={
        "help": "also write each scored record's line and score here"})

    def __post_init__(self):
        check_ranges(self)
        if self.min_signal < 0:
            raise ValueError(f"--min_signal must be >= 0, got {self.min_signal}")
        if self.max_completion_length < 1:
            raise ValueError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")


def read_records(path: str) -> tuple[list[tuple[int, dict]], dict[str, int], int]:
    """(line, raw record) of every usable record, skip counts by reason, records read. Malformed: DataError."""
    from auxiliary.runtime.io_utils import DataError, iter_jsonl
    from offline_sdpo.offline_sdpo_trainer import SkipRecord, normalize_record

    usable, skipped, read = [], {}, 0
    for line_number, raw in iter_jsonl(path):
        read += 1
        try:
            normalize_record(raw)
        except SkipRecord as reason:
            skipped[str(reason)] = skipped.get(str(reason), 0) + 1
            continue
        except ValueError as err:
            raise DataError(f"{path}:{line_number}: {err}") from None
        usable.append((line_number, raw))
    return usable, skipped, read


def signal_magnitudes(model, tokenizer, records: list[dict], args: FilterFollowupsArgs) -> list[float]:
    """Mean |log p(y|x,o) - log p(y|x)| over the reply tokens of each record, `batch_size` records per pass."""
    from offline_sdpo.offline_sdpo_trainer import SDPOCollator
    from sdpo_objective import compute_signal

    collator = SDPOCollator(tokenizer, args.max_context_length, args.max_completion_length, args.hindsight_template)
    scores = []
    for start in range(0, len(records), args.batch_size):
        batch = collator([record for record in records[start:start + args.batch_size]])
        results = compute_signal(model, batch["x_ids"], batch["xo_ids"], batch["completion_ids"],
                                 tokenizer.pad_token_id, max_context_length=args.max_context_length)
        scores.extend(sum(abs(a) for a in r["signal"]) / len(r["signal"]) for r in results)
    return scores


def spread(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p10": at(0.1), "median": at(0.5), "p90": at(0.9), "max": ordered[-1]}


def run(args: FilterFollowupsArgs) -> dict:
    from auxiliary.runtime.cli import ConfigError
    from auxiliary.runtime.io_utils import DataError, atomic_write_json, atomic_write_jsonl
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from sdpo_objective import validate_template

    for name in ("input_jsonl", "output_jsonl", "model"):
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required")
    validate_template(args.hindsight_template)
    usable, skipped, read = read_records(args.input_jsonl)  # every record checked before the model loads
    if not usable:
        raise DataError(f"{args.input_jsonl}: no usable interaction records ({read} read)")
    model, tokenizer, model_path = load_model_and_tokenizer(args.model, args.dtype, args.attn_implementation,
                                                            args.device)
    scores = signal_magnitudes(model, tokenizer, [raw for _, raw in usable], args)
    kept = [raw for (_, raw), score in zip(usable, scores) if score >= args.min_signal]
    summary = {
        "input": args.input_jsonl, "output": args.output_jsonl, "model": args.model, "model_path": model_path,
        "min_signal": args.min_signal, "read": read, "skipped": skipped, "scored": len(usable),
        "dropped_low_signal": len(usable) - len(kept), "kept": len(kept), "signal_abs_mean": spread(scores),
    }
    atomic_write_jsonl(args.output_jsonl, kept)
    atomic_write_json(summary_path(args.output_jsonl), summary)
    if args.scores_jsonl:
        atomic_write_jsonl(args.scores_jsonl,
                           [{"line": line, "signal_abs_mean": score, "kept": score >= args.min_signal}
                                               for (line, _), score in zip(usable, scores)])
    print(describe(summary), flush=True)
    return summary


def summary_path(output_jsonl: str) -> Path:
    output = Path(output_jsonl)
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")


def describe(summary: dict) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary["skipped"].items())) or "none"
    values = ", ".join(f"{k} {v:.4f}" for k, v in summary["signal_abs_mean"].items())
    return (f"filter_followups: {summary['read']} records read, skipped: {skipped}; {summary['scored']} scored "
            f"(mean |signal| per token: {values}); {summary['dropped_low_signal']} dropped below "
            f"--min_signal {summary['min_signal']:g}; {summary['kept']} kept -> {summary['output']}")


def main(argv: list[str] | None = None) -> int:
    from auxiliary.runtime.cli import run_cli

    return run_cli(FilterFollowupsArgs, run, argv, prog="filter_followups.py")


if __name__ == "__main__":
    sys.exit(main())
