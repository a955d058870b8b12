"""How much does the hindsight block's wording move the signal? Ours against two paraphrases (issue #27; no training).

For each case of auxiliary/signal_analysis_cases.json the initial policy samples one reply (seeded, the
demo's sampling: temperature 0.7, top-p 0.9, 96 tokens). The same reply ids are scored under the case's
follow-up with each hindsight template (sdpo_objective.compute_signal), and the simple_signal update of
all cases together is formed under each (sdpo_objective.sdpo_loss, one backward, all weights):

    token correlation    Pearson r of A_t between ours and a paraphrase, pooled over every reply token,
                         raw and centred per reply (as --center_signal trains)
    case correlation     the mean over cases of the per-reply Pearson r
    update cosine        cosine of the two loss gradients (all parameters, flattened): the update direction;
                         and the mean over cases of the per-case gradient cosine (--per_case)

    .venv/bin/python bench/hindsight_wording.py [--model smollm2-135m-instruct] [--n_cases 24] [--per_case]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Paraphrases of our block (sdpo_objective.DEFAULT_HINDSIGHT_TEMPLATE), written for this measurement: the same
# content (a marker, where the message comes from, what to do with it), other words and layout.
PARAPHRASES = {
    "paraphrase_a": ("\n\n--- LATER FEEDBACK ---\n(The user sent the message below after seeing your reply. "
                     "Keep it in mind when you answer the request above.)\n{followup}"),
    "paraphrase_b": ("\n\nNote: after reading your response, the user replied: \"{followup}\" "
                     "Answer the question above with this reaction in mind."),
}


def pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else float("nan")


def centred(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    return [v - mean for v in values]


def gradient(model, tokenizer, conversations, replies, followups, template: str):
    """The gradient of the simple_signal loss of these interactions under `template` (one tensor per parameter),
    up to a positive factor: one backward per interaction, summed in .grad (a 24-reply batch's activations
    took over 5 GB), the same direction as the batch's mean loss."""
    from sdpo_objective import ObjectiveOptions, build_scoring_batch, hindsight_contexts, sdpo_loss

    pad = tokenizer.pad_token_id or 0
    model.zero_grad(set_to_none=True)
    for conversation, reply, followup in zip(conversations, replies, followups):
        x, xo, _ = hindsight_contexts(tokenizer, conversation, followup, template)
        loss, _ = sdpo_loss(model, build_scoring_batch([x], [reply], pad), build_scoring_batch([xo], [reply], pad),
                            ObjectiveOptions(loss_mode="simple_signal"))
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # kept as they are: no flattened copy
    model.zero_grad(set_to_none=True)
    return grads


def cosine(a, b) -> float:
    """Cosine of two gradients given as lists of tensors (all parameters), in float64 sums."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    norm_a = math.sqrt(sum(float(x.double().square().sum()) for x in a))
    norm_b = math.sqrt(sum(float(y.double().square().sum()) for y in b))
    return dot / (norm_a * norm_b)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cases", type=Path, default=REPO_ROOT / "auxiliary/signal_analysis_cases.json")
    parser.add_argument("--n_cases", type=int, default=0, help="first N cases (0 = all)")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--per_case", action="store_true", help="also each case's own update cosine")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    from auxiliary.runtime.generation import generate_responses
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE, compute_signal, hindsight_contexts

    cases = json.loads(args.cases.read_text())
    cases = cases[:args.n_cases] if args.n_cases else cases
    model, tokenizer, _ = load_model_and_tokenizer(args.model, "fp32", "sdpa", "cpu")
    model.eval()  # no dropout in these models: the same numbers as train mode
    conversations = [[{"role": "user", "content": c["prompt"]}] for c in cases]
    followups = [c["followup"] for c in cases]
    replies = [list(r.ids) for r in generate_responses(model, tokenizer, conversations, args.max_new_tokens, 0.7, 0.9,
                                                       16, None, args.seed)]
    templates = {"ours": DEFAULT_HINDSIGHT_TEMPLATE, **PARAPHRASES}
    pad = tokenizer.pad_token_id or 0
    signals = {}
    for name, template in templates.items():
        contexts = [hindsight_contexts(tokenizer, c, o, template) for c, o in zip(conversations, followups)]
        results = compute_signal(model, [c[0] for c in contexts], [c[1] for c in contexts], replies, pad)
        signals[name] = [r["signal"] for r in results]
    # one gradient of 135M floats at a time besides ours (a 2-core machine shared by six jobs has little memory)
    ours = gradient(model, tokenizer, conversations, replies, followups, templates["ours"])
    update_cosines, between = {}, None
    for name in PARAPHRASES:
        other = gradient(model, tokenizer, conversations, replies, followups, templates[name])
        update_cosines[name] = cosine(ours, other)
        if between is None:
            between = other
        else:
            between = cosine(between, other)
        del other
    tokens = sum(len(r) for r in replies)
    print(f"{args.model}: {len(cases)} cases of {args.cases.name}, one reply each ({tokens} tokens; seed {args.seed})")
    print(f"{'against ours':<14} {'token r':>8} {'centred r':>10} {'case r':>8} {'update cos':>11}"
          + (f" {'case cos':>9}" if args.per_case else ""))
    results = {}
    pooled_ours = [v for s in signals["ours"] for v in s]
    centred_ours = [v for s in signals["ours"] for v in centred(s)]
    for name in PARAPHRASES:
        pooled = [v for s in signals[name] for v in s]
        row = {"token_r": pearson(pooled_ours, pooled),
               "centred_token_r": pearson(centred_ours, [v for s in signals[name] for v in centred(s)]),
               "case_r": sum(pearson(a, b) for a, b in zip(signals["ours"], signals[name])) / len(cases),
               "update_cosine": update_cosines[name]}
        if args.per_case:
            per_case = []
            for index in range(len(cases)):
                one = [conversations[index]], [replies[index]], [followups[index]]
                per_case.append(cosine(gradient(model, tokenizer, *one, templates["ours"]),
                                       gradient(model, tokenizer, *one, templates[name])))
            row["case_update_cosine"] = sum(per_case) / len(per_case)
        results[name] = row
        print(f"{name:<14} {row['token_r']:>8.3f} {row['centred_token_r']:>10.3f} {row['case_r']:>8.3f} "
              f"{row['update_cosine']:>11.3f}" + (f" {row['case_update_cosine']:>9.3f}" if args.per_case else ""))
    mean_abs = {name: sum(abs(v) for s in signals[name] for v in s) / tokens for name in templates}
    print("mean |A_t|: " + ", ".join(f"{name} {value:.4f}" for name, value in mean_abs.items()))
    token_r = pearson([v for s in signals["paraphrase_a"] for v in s], [v for s in signals["paraphrase_b"] for v in s])
    print(f"between the paraphrases: token r {token_r:.3f}, update cosine {between:.3f}")
    return results


if __name__ == "__main__":
    main()
