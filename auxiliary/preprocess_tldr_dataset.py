"""TL;DR (openai/summarize_from_feedback, "comparisons") -> Reddit summarisation prompts.

    python auxiliary/preprocess_tldr_dataset.py --out_dir data/tldr_prompts_unique

writes `train.jsonl` and `validation.jsonl`, one `{"prompt": ...}` per line: the post's
subreddit, title and text under a TL;DR instruction. The comparisons data hold many
summary pairs per post, so prompts are deduplicated within a split and across splits
(no validation prompt also appears in train). Rows without a Reddit post (the CNN/DM
articles of the validation data) and posts outside the length limits are dropped.
A row's own `split` field (train / valid1 / valid2) decides its split when present.

`--paper_format` writes the prompts as the paper's runs used them: a message list with a system
prompt asking for a summary of one or two sentences that begins with "TL;DR:", and the text as
the user message; news articles (the CNN/DM rows of the validation data) are kept too.
"""
from __future__ import annotations

import argparse
import sys

from auxiliary.data.preprocess_common import (  # stdlib-only module: --help stays light
    Summary, canonical_split, load_splits, normalize_prompt_key, over_limit, parse_args_with_presets, progress,
    run_cli, write_prompt_splits,
)
from auxiliary.runtime.io_utils import DataError

INSTRUCTION = "Write a TL;DR for the following Reddit post: a summary of a sentence or two."
PAPER_SYSTEM_PROMPT = ("Summarise the text the user sends in one or two sentences. Begin your answer with "
                       "\"TL;DR:\" and write nothing else.")


def format_prompt(info: dict) -> str:
    subreddit = (info.get("subreddit") or "").strip()
    title = (info.get("title") or "").strip()
    post = (info.get("post") or "").strip()
    header = [f"SUBREDDIT: r/{subreddit}"] if subreddit else []
    header += [f"TITLE: {title}"] if title else []
    return f"{INSTRUCTION}\n\n" + "\n".join(header + [f"POST: {post}"])


def format_paper_prompt(info: dict) -> list[dict]:
    """The paper's format: system prompt + the post (with its subreddit and title) or the article."""
    text = (info.get("post") or info.get("article") or "").strip()
    header = [f"SUBREDDIT: r/{info['subreddit'].strip()}"] if (info.get("subreddit") or "").strip() else []
    header += [f"TITLE: {info['title'].strip()}"] if (info.get("title") or "").strip() else []
    body = "\n".join(header + [f"POST: {text}" if info.get("post") else f"ARTICLE: {text}"])
    return [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, {"role": "user", "content": body}]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="openai/summarize_from_feedback",
                        help="hub name or local file/folder (default: %(default)s)")
    parser.add_argument("--config", default="comparisons", help="hub config (default: %(default)s)")
    parser.add_argument("--out_dir", default="data/tldr_prompts_unique", help="output folder (default: %(default)s)")
    parser.add_argument("--min_post_chars", type=int, default=50, help="drop shorter posts (default: %(default)s)")
    parser.add_argument("--max_post_chars", type=int, default=3000,
                        help="drop longer posts (0 = no limit; default: %(default)s)")
    parser.add_argument("--paper_format", action="store_true",
                        help="the paper's prompts: a TL;DR system prompt + the text as a message list; articles kept")
    return parser


def select_prompts(splits, args, summary: Summary) -> dict[str, list[dict]]:
    candidates: dict[str, list[str]] = {"train": [], "validation": []}
    for split_name, rows in splits.items():
        for where, record in progress(rows, total=len(rows), desc=f"TL;DR {split_name}"):
            summary.count("rows read")
            info = record.get("info")
            if not isinstance(info, dict):
                raise DataError(f"{where}: record has no 'info' object (expected the 'comparisons' schema)")
            target = canonical_split(record.get("split") or split_name)
            post = (info.get("post") or "").strip()
            if args.paper_format and not post:
                post = (info.get("article") or "").strip()  # the paper keeps the news articles
            if target not in candidates:
                summary.drop("unknown_split", "row")
            elif not post:
                summary.drop("no_post", "row")
            elif len(post) < args.min_post_chars:
                summary.drop("post_too_short", "row")
            elif over_limit(len(post), args.max_post_chars):
                summary.drop("post_too_long", "row")
            else:
                candidates[target].append(format_paper_prompt(info) if args.paper_format else format_prompt(info))
    # dedup after reading everything, so the row order of the input cannot let a
    # validation prompt slip in before its train twin is seen
    kept: dict[str, list[dict]] = {"train": [], "validation": []}
    seen: dict[str, set[str]] = {"train": set(), "validation": set()}
    for target in ("train", "validation"):
        for prompt in candidates[target]:
            key = normalize_prompt_key(prompt if isinstance(prompt, str) else prompt[-1]["content"])
            if key in seen[target]:
                summary.drop("duplicate_in_split", "row")
            elif target == "validation" and key in seen["train"]:
                summary.drop("duplicate_of_train", "row")
            else:
                seen[target].add(key)
                kept[target].append({"prompt": prompt})
    return kept


def main(argv=None) -> Summary:
    args = parse_args_with_presets(build_parser(), argv)  # ranges checked there
    summary = Summary("preprocess_tldr_dataset")
    prompts = select_prompts(load_splits(args.dataset, args.config), args, summary)
    write_prompt_splits(args.out_dir, prompts, summary)
    summary.print()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
