"""WildFeedback (microsoft/WildFeedback) -> interaction records for offline SDPO.

    python auxiliary/preprocess_wildfeedback.py

writes `data/wildfeedback/wildfeedback_interactions.jsonl`: one record per assistant
turn that the user answered, with `prompt` (the last 5 messages before the reply,
starting with a user message), `completion` (the logged reply) and `user_response`
(the user's next message). The `wildfeedback` config stores each conversation as
`conversations` (from/value, human/gpt); the same conversation prefix recurs across
preference pairs, so identical interactions are kept once. `--dataset` also takes a
local copy (e.g. the hub's `wildfeedback.json`, a JSONL or a parquet file).

`--paper_filters`: the paper's length rules (a conversation dropped when longer than 100k
characters or any turn longer than 4,096; history of the last 5 messages, starting with the user).
"""
from __future__ import annotations

import argparse
import os
import sys

from auxiliary.data.preprocess_common import (  # stdlib-only module: --help stays light
    PAPER_FILTERS, InteractionBuilder, InteractionFilters, Summary, add_interaction_filter_args, all_rows,
    convert_conversations, load_splits, parse_args_with_presets, run_cli, write_jsonl,
)

OUTPUT_NAME = "wildfeedback_interactions.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="microsoft/WildFeedback",
                        help="hub name or local file/folder (default: %(default)s)")
    parser.add_argument("--config", default="wildfeedback", help="hub config (default: %(default)s)")
    parser.add_argument("--out_dir", default="data/wildfeedback", help="output folder (default: %(default)s)")
    parser.add_argument("--out", default=None, help=f"output file (default: OUT_DIR/{OUTPUT_NAME})")
    parser.add_argument("--max_interactions", type=int, default=None, help="keep at most this many (default: all)")
    add_interaction_filter_args(parser)
    return parser


def main(argv=None) -> Summary:
    args = parse_args_with_presets(build_parser(), argv, PAPER_FILTERS)
    summary = Summary("preprocess_wildfeedback")
    rows = all_rows(load_splits(args.dataset, args.config))
    builder = InteractionBuilder(InteractionFilters.from_args(args), summary)
    records = convert_conversations(rows, builder, max_interactions=args.max_interactions, desc="WildFeedback")
    write_jsonl(args.out or os.path.join(args.out_dir, OUTPUT_NAME), records, summary)
    summary.print()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
