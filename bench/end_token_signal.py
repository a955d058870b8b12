"""Does the end-of-turn token get a hindsight signal where a reply could stop? (issue #27; no training)

The demo's training replies are cut off at 96 tokens, so the sampled-token signal never reaches the end token.
For the step-0 evaluation replies of an online run (cut at the same limit), this scores the end token at every
reply position after the first `ignore_first_k` under x, under the user's follow-up (xo) and the placebo's,
and under the contrast follow-up (x o_neutral), and prints, for positions right after a sentence end (the
previous token ends in . ! ? or a newline) and for the others:

    A_end          log p(<end> | xo, y<t) - log p(<end> | x o_neutral, y<t)   (what --end_signal_weight trains)
    p(<end> | x)   the initial policy's probability of stopping there

    .venv/bin/python bench/end_token_signal.py RUN_DIR [--followup TEXT] [--placebo TEXT] [--contrast_followup TEXT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_copy_signal import PLACEBO_FOLLOWUP, load_run, mean_and_se  # noqa: E402

CONTRAST_FOLLOWUP = "Thanks."  # the demo's (configs/demo.yaml)
SENTENCE_ENDS = (".", "!", "?", "\n")


def end_logprobs(model, contexts: list[list[int]], replies: list[list[int]], end: int) -> list[list[float]]:
    """log p(<end> | context, y<t) at every position t of each reply (unbatched: exact, no padding)."""
    import torch

    rows = []
    with torch.no_grad():
        for context, reply in zip(contexts, replies):
            logits = model(torch.tensor([context + reply])).logits[0, len(context) - 1:len(context) + len(reply) - 1]
            rows.append(torch.log_softmax(logits.float(), dim=-1)[:, end].tolist())
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an eval_online_sdpo.py output folder")
    parser.add_argument("--model", default=None, help="default: the run's resolved model path")
    parser.add_argument("--followup", default=None, help="the user's (default: the run's first)")
    parser.add_argument("--placebo", default=PLACEBO_FOLLOWUP)
    parser.add_argument("--contrast_followup", default=CONTRAST_FOLLOWUP)
    parser.add_argument("--n", type=int, default=30, help="the first N replies")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from sdpo_objective import end_token_ids, hindsight_contexts

    model_path, texts, followup, ignore_first_k = load_run(args.run, args.model, None)
    model, tokenizer, _ = load_model_and_tokenizer(model_path, "fp32", "sdpa", "cpu")
    model.eval()
    end = end_token_ids(model)[0]  # SmolLM2: its one stop token, <|im_end|>
    texts = texts[:args.n]
    messages = [[{"role": "user", "content": prompt}] for prompt, _ in texts]
    replies = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in texts]
    after_end = [[t > 0 and tokenizer.decode(ids[t - 1:t]).rstrip(" ").endswith(SENTENCE_ENDS) for t in range(len(ids))]
                 for ids in replies]
    x = [hindsight_contexts(tokenizer, m, args.contrast_followup, contrast_followup=args.contrast_followup)
         for m in messages]
    student = end_logprobs(model, [c[0] for c in x], replies, end)
    neutral = end_logprobs(model, [c[2] for c in x], replies, end)
    results = {}
    print(f"{len(replies)} step-0 eval replies of {args.run}; end token {tokenizer.convert_ids_to_tokens(end)!r}; "
          f"contrast {args.contrast_followup!r}; positions from ignore_first_k {ignore_first_k}")
    for name, text in (("user", args.followup or followup), ("placebo", args.placebo)):
        xo = end_logprobs(model, [hindsight_contexts(tokenizer, m, text)[1] for m in messages], replies, end)
        for group, wanted in (("after a sentence end", True), ("elsewhere", False)):
            signal, stop = [], []
            for s, o, n, flags in zip(student, xo, neutral, after_end):
                for t in range(ignore_first_k, len(flags)):
                    if flags[t] == wanted:
                        signal.append(o[t] - n[t])
                        stop.append(2.718281828459045 ** s[t])
            (a, a_se), (p, p_se) = mean_and_se(signal), mean_and_se(stop)
            results[(name, group)] = {"A_end": a, "A_end_se": a_se, "p_end": p, "n": len(signal)}
            print(f"{name:<8} {text!r:<44} {group:<21} A_end {a:+.3f} +- {a_se:.3f}   "
                  f"p(<end> | x) {p:.4f} +- {p_se:.4f}   (n={len(signal)})")
    return results


if __name__ == "__main__":
    main()
