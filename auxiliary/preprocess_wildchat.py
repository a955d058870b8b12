"""WildChat (allenai/WildChat) -> interaction records for offline SDPO.

    python auxiliary/preprocess_wildchat.py

writes `data/wildchat/wildchat_interactions_v1.jsonl` (same record format as the
WildFeedback preprocessor). Only English conversations are used (the conversation's
`language` field), toxic-flagged ones are skipped unless `--keep_toxic`. Conversations
are visited in a seeded random order and the scan stops at `--max_conversations`
(conversations that gave at least one interaction) or `--max_interactions`, so a given
seed and input always give the same file.

`--paper_filters` applies the paper's extraction: English, seeded shuffle, up to 15,000 kept
conversations or 50,000 interactions, a conversation dropped when longer than 100k characters
or when any turn is longer than 4,096 (PAPER_FILTERS in auxiliary/data/preprocess_common.py).
"""
from __future__ import annotations

import argparse
import os
import random
import sys

from auxiliary.data.preprocess_common import (  # stdlib-only module: --help stays light
    PAPER_FILTERS, InteractionBuilder, InteractionFilters, Summary, add_interaction_filter_args, all_rows,
    convert_conversations, load_splits, parse_args_with_presets, run_cli, write_jsonl,
)

OUTPUT_NAME = "wildchat_interactions_v1.jsonl"
ENGLISH = {"english", "en"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="allenai/WildChat",
                        help="hub name or local file/folder (default: %(default)s)")
    parser.add_argument("--config", default=None, help="hub config (default: none)")
    parser.add_argument("--out_dir", default="data/wildchat", help="output folder (default: %(default)s)")
    parser.add_argument("--out", default=None, help=f"output file (default: OUT_DIR/{OUTPUT_NAME})")
    parser.add_argument("--seed", type=int, default=42, help="seed of the conversation order (default: %(default)s)")
    parser.add_argument("--max_conversations", type=int, default=20000,
                        help="cap on conversations used (default: %(default)s)")
    parser.add_argument("--max_interactions", type=int, default=20000,
                        help="cap on interactions written (default: %(default)s)")
    parser.add_argument("--keep_toxic", action="store_true", help="keep conversations flagged toxic")
    add_interaction_filter_args(parser)
    return parser


def make_conversation_filter(keep_toxic: bool):
    def reject_reason(record: dict) -> str | None:
        language = record.get("language")
        if not isinstance(language, str) or language.strip().lower() not in ENGLISH:
            return "non_english"
        if not keep_toxic and record.get("toxic") is True:
            return "toxic"
        return None

    return reject_reason


def main(argv=None) -> Summary:
    args = parse_args_with_presets(build_parser(), argv,
                                   {**PAPER_FILTERS, "max_conversations": 15_000, "max_interactions": 50_000})
    summary = Summary("preprocess_wildchat")
    rows = all_rows(load_splits(args.dataset, args.config))
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    builder = InteractionBuilder(InteractionFilters.from_args(args), summary)
    records = convert_conversations(
        rows, builder, order=order, reject_reason=make_conversation_filter(args.keep_toxic),
        max_conversations=args.max_conversations, max_interactions=args.max_interactions,
        message_fields=("conversation",), desc="WildChat",
    )
    write_jsonl(args.out or os.path.join(args.out_dir, OUTPUT_NAME), records, summary)
    summary.print()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
