"""HelpSteer2 -> single-turn prompts for online SDPO.

    python auxiliary/preprocess_helpsteer.py --out_dir data/helpsteer_prompts

writes `train.jsonl` and `validation.jsonl`, one `{"prompt": ...}` per line. HelpSteer2
rates two responses per prompt, so prompts repeat: they are deduplicated within a split,
and a validation prompt that also occurs in train is dropped. Multi-turn prompts (turns
joined by `<extra_id_1>` markers in HelpSteer2) are dropped, as are prompts outside the
length limits. `--max_response_chars N` also drops every prompt one of whose rated responses is
longer than N characters (0, the default, keeps them); `--paper_filters` sets it to 8000
(about 2,048 tokens, the online presets' reply limit; our value: the paper's preprocessing
scripts are not available to confirm it). `--dataset` takes the hub name or a local file / folder
(a folder with train/validation files, or a `save_to_disk` folder).
"""
from __future__ import annotations

import argparse
import sys

from auxiliary.data.preprocess_common import (  # stdlib-only module: --help stays light
    Summary, canonical_split, load_splits, normalize_prompt_key, over_limit, parse_args_with_presets, progress,
    run_cli, write_prompt_splits,
)
from auxiliary.runtime.io_utils import DataError

MULTI_TURN_MARKER = "<extra_id_1>"
# --paper_filters: about 2,048 tokens of reply (the online presets' max_new_tokens) at ~4 characters a token.
# Our choice, documented as such: the paper's preprocessing scripts are not available to confirm it.
PAPER_FILTERS = {"max_response_chars": 8000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="nvidia/HelpSteer2",
                        help="hub name or local file/folder (default: %(default)s)")
    parser.add_argument("--out_dir", default="data/helpsteer_prompts", help="output folder (default: %(default)s)")
    parser.add_argument("--min_prompt_chars", type=int, default=10, help="drop shorter prompts (default: %(default)s)")
    parser.add_argument("--max_prompt_chars", type=int, default=4000,
                        help="drop longer prompts (0 = no limit; default: %(default)s)")
    parser.add_argument("--max_response_chars", type=int, default=0,
                        help="drop prompts with a rated response longer than this, in characters (0 = no limit; "
                             "default: %(default)s)")
    parser.add_argument("--paper_filters", action="store_true",
                        help="preset: " + ", ".join(f"{k}={v}" for k, v in PAPER_FILTERS.items())
                             + " (our value, not confirmed from the paper's scripts); flags given as well still win")
    return parser


def prompts_with_long_responses(splits, used: set[str], limit: int) -> set[str]:
    """Prompt keys of which some row's response is longer than `limit` characters (0: none)."""
    if limit <= 0:
        return set()
    long_keys = set()
    for split_name, rows in splits.items():
        if canonical_split(split_name) not in used:
            continue
        for where, record in rows:
            response = record.get("response")
            if response is None:
                raise DataError(f"{where}: record has no 'response' field (needed by --max_response_chars)")
            if isinstance(response, str) and len(response) > limit and isinstance(record.get("prompt"), str):
                long_keys.add(normalize_prompt_key(record["prompt"]))
    return long_keys


def select_prompts(splits, args, summary: Summary) -> dict[str, list[dict]]:
    kept: dict[str, list[dict]] = {"train": [], "validation": []}
    seen: dict[str, set[str]] = {"train": set(), "validation": set()}
    long_responses = prompts_with_long_responses(splits, set(kept), args.max_response_chars)
    # train first, so that the cross-split check sees every train prompt
    for split_name in sorted(splits, key=lambda s: canonical_split(s) != "train"):
        target = canonical_split(split_name)
        rows = splits[split_name]
        if target not in kept:
            summary.drop(f"split_{split_name}_not_used", "row", len(rows))
            continue
        for where, record in progress(rows, total=len(rows), desc=f"HelpSteer2 {split_name}"):
            summary.count("rows read")
            if "prompt" not in record:
                raise DataError(f"{where}: record has no 'prompt' field")
            prompt = record["prompt"] if isinstance(record["prompt"], str) else ""
            key = normalize_prompt_key(prompt)
            if not key:
                summary.drop("empty_prompt", "row")
            elif MULTI_TURN_MARKER in prompt:
                summary.drop("multi_turn", "row")
            elif len(prompt.strip()) < args.min_prompt_chars:
                summary.drop("prompt_too_short", "row")
            elif over_limit(len(prompt), args.max_prompt_chars):
                summary.drop("prompt_too_long", "row")
            elif key in long_responses:  # every row of the prompt, whichever response is the long one
                summary.drop("response_too_long", "row")
            elif key in seen[target]:
                summary.drop("duplicate_in_split", "row")
            elif target == "validation" and key in seen["train"]:
                summary.drop("duplicate_of_train", "row")
            else:
                seen[target].add(key)
                kept[target].append({"prompt": prompt.strip()})
    return kept


def main(argv=None) -> Summary:
    args = parse_args_with_presets(build_parser(), argv, PAPER_FILTERS)  # ranges checked there
    summary = Summary("preprocess_helpsteer")
    prompts = select_prompts(load_splits(args.dataset), args, summary)
    write_prompt_splits(args.out_dir, prompts, summary)  # everything is selected before anything is written
    summary.print()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
