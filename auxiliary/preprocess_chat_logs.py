"""Your own chat logs -> interaction records for offline SDPO.

    python auxiliary/preprocess_chat_logs.py --input my_logs.jsonl --out data/chat_logs/interactions.jsonl

Input: JSONL (or a JSON array, parquet, or a folder of them), one conversation per
record, its messages under `messages` (also accepted: `conversation`, `conversations`),
each message `{"role": "user"|"assistant"|"system", "content": "..."}` or ShareGPT style
`{"from": "human"|"gpt", "value": "..."}`. An optional `id` (or `conversation_id`) names
the conversation; otherwise its line number does (`line5`; `name.jsonl:line5` in a folder of
files), and each record's id is that name and the reply's turn (`line5:1`). Output: one record per assistant reply
that the user answered, with the same fields and filters as the WildChat/WildFeedback
preprocessors; the offline trainer reads it with `--train_jsonl`.
"""
from __future__ import annotations

import argparse
import sys

from auxiliary.data.preprocess_common import (  # stdlib-only module: --help stays light
    InteractionBuilder, InteractionFilters, Summary, add_interaction_filter_args, all_rows,
    convert_conversations, load_splits, parse_args_with_presets, run_cli, write_jsonl,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", "--dataset", dest="input", required=True,
                        help="JSONL of conversations (or .json / .parquet / folder / hub name)")
    parser.add_argument("--out", default="data/chat_logs/interactions.jsonl", help="output file (default: %(default)s)")
    parser.add_argument("--max_interactions", type=int, default=None, help="keep at most this many (default: all)")
    add_interaction_filter_args(parser)
    return parser


def main(argv=None) -> Summary:
    args = parse_args_with_presets(build_parser(), argv)  # ranges checked there
    summary = Summary("preprocess_chat_logs")
    rows = all_rows(load_splits(args.input))
    builder = InteractionBuilder(InteractionFilters.from_args(args), summary)
    records = convert_conversations(rows, builder, max_interactions=args.max_interactions, desc="chat logs")
    write_jsonl(args.out, records, summary)
    summary.print()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
