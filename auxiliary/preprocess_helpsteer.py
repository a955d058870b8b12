"""HelpSteer2 -> single-turn prompts for online SDPO.

    python auxiliary/preprocess_helpsteer.py --out_dir data/helpsteer_prompts

writes `train.jsonl` and `validation.jsonl`, one `{"prompt": ...}` per line. HelpSteer2
rates two responses per prompt, so prompts repeat: they are deduplicated within a split,
and a validation prompt that also occurs in train is dropped. Multi-turn prompts (turns
joined by `<extra_id_1>` markers in HelpSteer2) are dropped, as are prompts outside the
length limits. `--dataset` takes the hub name or a local file / folder (a folder with
train/validation files, or a `save_to_disk` folder).
"""
from __future__ import annotations

import argparse
import os
import sys

from auxiliary.data.preprocess_common import (  # stdlib-only module: --help stays light
    Summary, canonical_split, load_splits, normalize_prompt_key, progress, run_cli, write_jsonl,
)
from auxiliary.runtime.io_utils import DataError

MULTI_TURN_MARKER = "<extra_id_1>"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="nvidia/HelpSteer2", help="hub name or local file/folder (default: %(default)s)")
    parser.add_argument("--out_dir", default="data/helpsteer_prompts", help="output folder (default: %(default)s)")
    parser.add_argument("--min_prompt_chars", type=int, default=10, help="drop shorter prompts (default: %(default)s)")
    parser.add_argument("--max_prompt_chars", type=int, default=4000, help="drop longer prompts (default: %(default)s)")
    return parser


def select_prompts(splits, args, summary: Summary) -> dict[str, list[dict]]:
    kept: dict[str, list[dict]] = {"train": [], "validation": []}
    seen: dict[str, set[str]] = {"train": set(), "validation": set()}
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
            elif len(prompt) > args.max_prompt_chars:
                summary.drop("prompt_too_long", "row")
            elif key in seen[target]:
                summary.drop("duplicate_in_split", "row")
            elif target == "validation" and key in seen["train"]:
                summary.drop("duplicate_of_train", "row")
            else:
                seen[target].add(key)
                kept[target].append({"prompt": prompt.strip()})
    return kept


def main(argv=None) -> Summary:
    args = build_parser().parse_args(argv)
    summary = Summary("preprocess_helpsteer")
    prompts = select_prompts(load_splits(args.dataset), args, summary)
    for split, records in prompts.items():  # everything is selected before anything is written
        if not records:
            summary.notes.append(f"{split}.jsonl is empty: the input had no usable {split} prompts")
        write_jsonl(os.path.join(args.out_dir, f"{split}.jsonl"), records, summary)
    summary.print()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
