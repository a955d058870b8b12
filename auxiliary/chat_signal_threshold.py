"""Measure mean |signal| for follow-ups about a reply vs follow-ups that change the subject.

This is how the default of `chat_sdpo.py --min_signal` was chosen (README, section chat):

    python auxiliary/chat_signal_threshold.py --model smollm2-135m-instruct --out /tmp/chat_signal.json

For each prompt one reply is sampled; every follow-up is scored against that same reply
(same ids), so the two groups differ only in o.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Write a short email to my manager asking for Friday off.",
    "Explain how photosynthesis works.",
    "Give me three tips for better sleep.",
    "What should I cook for dinner tonight?",
    "How do I reverse a list in Python?",
    "Tell me a short story about a lighthouse keeper.",
]
RELATED = [  # about the reply: its length, tone, format, correctness, or thanks for it
    "Too long. Please be much more concise.",
    "Please use a formal, professional tone.",
    "No bullet points or lists please, write plain prose.",
    "That is not what I asked for, answer the actual question.",
    "Thanks, that's exactly what I needed!",
]
UNRELATED = [  # a new topic: says nothing about the reply
    "What is 27 times 4?",
    "What's the capital of Australia?",
    "Can you recommend a good science fiction novel?",
    "How many legs does a spider have?",
]


def measure(model_name: str, max_new_tokens: int, seed: int) -> dict:
    from tqdm.auto import tqdm

    from auxiliary.runtime.generation import generate_responses
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from sdpo_objective import check_lm_head, compute_signal, hindsight_messages, render_context_ids

    model, tokenizer, _ = load_model_and_tokenizer(model_name)
    check_lm_head(model)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    replies = generate_responses(model, tokenizer, conversations, max_new_tokens, temperature=0.7, top_p=0.9,
                                 seed=seed)
    rows = []
    for conversation, reply in tqdm(list(zip(conversations, replies)), desc="score"):
        followups = [(o, "related") for o in RELATED] + [(o, "unrelated") for o in UNRELATED]
        context_x = render_context_ids(tokenizer, conversation)
        contexts_xo = [render_context_ids(tokenizer, hindsight_messages(conversation, o)) for o, _ in followups]
        signals = compute_signal(model, [context_x] * len(followups), contexts_xo, [reply.ids] * len(followups),
                                 tokenizer.pad_token_id)
        for (followup, group), result in zip(followups, signals):
            values = result["signal"]
            rows.append({"prompt": conversation[0]["content"], "followup": followup, "group": group,
                         "tokens": len(values), "signal_mean": statistics.fmean(values),
                         "signal_abs_mean": statistics.fmean(abs(v) for v in values)})
    return {"model": model_name, "seed": seed, "max_new_tokens": max_new_tokens, "rows": rows,
            "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for group in ("related", "unrelated"):
        values = [r["signal_abs_mean"] for r in rows if r["group"] == group]
        summary[group] = {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
                          "min": min(values), "max": max(values)}
    summary["by_followup"] = {o: statistics.fmean(r["signal_abs_mean"] for r in rows if r["followup"] == o)
                              for o in dict.fromkeys(r["followup"] for r in rows)}
    summary["best_threshold"] = best_threshold(rows)
    return summary


def best_threshold(rows: list[dict]) -> dict:
    """The cut on mean |signal| that best separates related (update) from unrelated (skip) follow-ups."""
    candidates = sorted({round(r["signal_abs_mean"], 3) for r in rows})
    best = {"threshold": 0.0, "accuracy": 0.0}
    for cut in candidates:
        correct = sum((r["signal_abs_mean"] >= cut) == (r["group"] == "related") for r in rows)
        if correct / len(rows) > best["accuracy"]:
            best = {"threshold": cut, "accuracy": correct / len(rows)}
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write all rows and the summary as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.model, args.max_new_tokens, args.seed)
    summary = result["summary"]
    for group in ("related", "unrelated"):
        s = summary[group]
        print(f"{group:9s} n={s['n']:2d}  mean |signal| {s['mean']:.3f}  median {s['median']:.3f}  "
              f"range {s['min']:.3f}-{s['max']:.3f}")
    for followup, value in summary["by_followup"].items():
        print(f"  {value:.3f}  {followup}")
    print(f"best single threshold {summary['best_threshold']['threshold']:.3f} "
          f"(accuracy {summary['best_threshold']['accuracy']:.0%})")
    if args.out:
        from auxiliary.runtime.io_utils import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
