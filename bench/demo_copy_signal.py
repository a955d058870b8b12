"""Does the centred hindsight signal favour tokens that repeat the reply's own earlier words, and do the
contrastive signal and the copy guard remove that? (issues #18, #27; no training)

For the initial policy's replies (the step-0 evaluation replies of an online run, or with `--generate`
replies sampled here to the demo's prompts with the demo's settings), the per-token signal is computed
as the demo trains it: centred per reply over the tokens the objective weights (`ignore_first_k`, and
the copy guard where on), through sdpo_objective's own `token_weights` and `shape_signal`. Four signals:

    plain      A_t = log p(y_t | x, o) - log p(y_t | x)                 (the paper's)
    contrast   A_t = log p(y_t | x, o) - log p(y_t | x, o_neutral)      (--contrast_followup)
    each with and without the copy guard (--copy_guard_ngram n)

under the user's follow-up and under the placebo's. Tokens are split into copy tokens (the trigram
ending there occurred earlier in the reply: sdpo_objective.repeated_ngram_mask), lead-in tokens (they
complete a repeated bigram but not a trigram: the token that starts copying an earlier phrase) and the
others; each group's mean centred signal is printed with its standard error. A positive mean on copy
tokens under both follow-ups means the update pushes repetition up whatever the user said.

    .venv/bin/python bench/demo_copy_signal.py /tmp/sdpo_runs/demo-<time> [--model PATH]
    .venv/bin/python bench/demo_copy_signal.py --generate [--prompts data/samples/validation.jsonl ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PLACEBO_FOLLOWUP = "OK, thanks."
USER_FOLLOWUP = "Can you make it much shorter?"  # the concise rule user's first follow-up in the demo of #18
CONTRAST_FOLLOWUP = "OK."
GROUPS = ("copy", "lead-in", "other")


def copy_tokens(ids: list[int], start: int) -> list[bool]:
    """For positions start.. of `ids`: whether the trigram ending there occurred earlier in `ids`."""
    from sdpo_objective import repeated_ngram_mask

    return repeated_ngram_mask(ids, 3)[start:]


def token_groups(ids: list[int]) -> list[str]:
    """copy (completes a repeated trigram), lead-in (a repeated bigram, not a trigram) or other, per token."""
    from sdpo_objective import repeated_ngram_mask

    trigram, bigram = repeated_ngram_mask(ids, 3), repeated_ngram_mask(ids, 2)
    return ["copy" if t else "lead-in" if b else "other" for t, b in zip(trigram, bigram)]


def centred(signal: list[float], ignore_first_k: int) -> list[float]:
    kept = signal[ignore_first_k:]
    mean = sum(kept) / len(kept) if kept else 0.0
    return [value - mean for value in kept]


def mean_and_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (values[0] if values else float("nan")), float("nan")
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def shaped_signal(raw: list[float], ids: list[int], ignore_first_k: int, copy_guard_ngram: int):
    """(the centred signal as the objective shapes it, the token weights) for one reply."""
    import torch

    from sdpo_objective import ObjectiveOptions, shape_signal, token_weights

    opts = ObjectiveOptions(loss_mode="simple_signal", center_signal=True, ignore_first_k=ignore_first_k,
                            copy_guard_ngram=copy_guard_ngram)
    weight = token_weights(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), opts)
    signal = shape_signal(torch.tensor(raw), weight, torch.zeros(len(ids), dtype=torch.long), 1, opts)
    return signal.tolist(), weight.tolist()


def load_run(run: Path, model_arg: str | None, ignore_first_k: int | None):
    config = json.loads((run / "config.json").read_text())
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    records = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    replies = [(r["prompt"], r["completion"]) for r in records
               if r["step"] == 0 and r["phase"] == "eval" and r["arm"] == "feedback"]
    k = config["sdpo"]["ignore_first_k"] if ignore_first_k is None else ignore_first_k
    return model_arg or config["resolved"]["model_path"], replies, first["feedback"]["followup"], k


def generate_replies(model, tokenizer, prompt_files: list[Path], samples: int, seed: int, n_prompts: int = 0):
    """[(prompt, reply ids)]: the initial policy's replies, sampled as the demo samples them (temperature 0.7,
    top-p 0.9, 96 tokens)."""
    from auxiliary.runtime.generation import generate_responses

    prompts = [json.loads(line)["prompt"] for path in prompt_files for line in path.read_text().splitlines()
               if line.strip()]
    prompts = prompts[:n_prompts] if n_prompts else prompts
    conversations = [[{"role": "user", "content": p}] for p in prompts for _ in range(samples)]
    replies = generate_responses(model, tokenizer, conversations, 96, 0.7, 0.9, 16, None, seed)
    return [(c[0]["content"], list(r.ids)) for c, r in zip(conversations, replies)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="an eval_online_sdpo.py output folder")
    parser.add_argument("--generate", action="store_true", help="sample the initial policy's replies here instead")
    parser.add_argument("--prompts", type=Path, nargs="+", default=[REPO_ROOT / "data/samples/validation.jsonl"])
    parser.add_argument("--n_prompts", type=int, default=0, help="--generate: the first N prompts (0 = all)")
    parser.add_argument("--samples", type=int, default=1, help="--generate: replies per prompt")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default=None,
                        help="default: the run's resolved model path, or smollm2-135m-instruct")
    parser.add_argument("--followup", default=None, help=f"the user's (default: the run's first, or {USER_FOLLOWUP!r})")
    parser.add_argument("--placebo", default=PLACEBO_FOLLOWUP)
    parser.add_argument("--contrast_followup", default=CONTRAST_FOLLOWUP)
    parser.add_argument("--copy_guard_ngram", type=int, default=3)
    parser.add_argument("--ignore_first_k", type=int, default=None, help="default: the run's, or 4 (the demo's)")
    args = parser.parse_args(argv)
    if (args.run is None) == (not args.generate):
        parser.error("give a run folder or --generate (one of them)")
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from sdpo_objective import compute_signal, hindsight_contexts

    if args.run is not None:
        model_path, texts, followup, ignore_first_k = load_run(args.run, args.model, args.ignore_first_k)
    model, tokenizer, _ = load_model_and_tokenizer(args.model or (model_path if args.run else "smollm2-135m-instruct"),
                                                   "fp32", "sdpa", "cpu")
    if args.run is not None:
        replies = [(prompt, tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                   for prompt, text in texts]
        source = f"{len(replies)} step-0 eval replies of {args.run}"
    else:
        torch.manual_seed(args.seed)
        replies = generate_replies(model, tokenizer, args.prompts, args.samples, args.seed, args.n_prompts)
        print(f"generated {len(replies)} replies", flush=True)
        followup, ignore_first_k = USER_FOLLOWUP, 4
        source = (f"{len(replies)} replies of the initial policy ({args.samples} per prompt of "
                  f"{', '.join(p.name for p in args.prompts)}"
                  f"{f', the first {args.n_prompts}' if args.n_prompts else ''}; seed {args.seed})")
    followup = args.followup or followup
    ignore_first_k = ignore_first_k if args.ignore_first_k is None else args.ignore_first_k
    followups = {"user": followup, "placebo": args.placebo}
    print(f"{source}; ignore_first_k {ignore_first_k}; contrast {args.contrast_followup!r}; "
          f"copy guard n {args.copy_guard_ngram}")
    groups_by_reply = [token_groups(ids) for _, ids in replies]
    table = {}
    pad = tokenizer.pad_token_id or 0
    for name, text in followups.items():
        raw = {"plain": [], "contrast": []}
        for start in range(0, len(replies), 8):  # 8 replies per batched forward
            chunk = replies[start:start + 8]
            contexts = [hindsight_contexts(tokenizer, [{"role": "user", "content": prompt}], text,
                                           contrast_followup=args.contrast_followup) for prompt, _ in chunk]
            results = compute_signal(model, [c[0] for c in contexts], [c[1] for c in contexts],
                                     [ids for _, ids in chunk], pad, contexts_neutral=[c[2] for c in contexts])
            for result in results:
                raw["plain"].append([a - b for a, b in zip(result["logp_xo"], result["logp_x"])])
                raw["contrast"].append(result["signal"])
        print(f"scored under the {name} follow-up", flush=True)
        for signal_name, signals in raw.items():
            for guard in (0, args.copy_guard_ngram):
                values = {group: [] for group in GROUPS}
                for (_, ids), signal, groups in zip(replies, signals, groups_by_reply):
                    shaped, weight = shaped_signal(signal, ids, ignore_first_k, guard)
                    kept = shaped_signal(signal, ids, ignore_first_k, 0)[1]  # the groups: tokens past ignore_first_k
                    for value, w, keep, group in zip(shaped, weight, kept, groups):
                        if keep:
                            values[group].append(value if w else 0.0)
                table[(signal_name, guard, name)] = {g: mean_and_se(v) + (len(v),) for g, v in values.items()}
    print(f"mean centred signal per token group (+- SE); user follow-up {followup!r}, placebo {args.placebo!r}")
    print(f"{'signal':<10} {'copy guard':<11} {'follow-up':<9} " + " ".join(f"{g:>24}" for g in GROUPS))
    for (signal_name, guard, name), cells in table.items():
        guard_text = f"n={guard}" if guard else "off"
        print(f"{signal_name:<10} {guard_text:<11} {name:<9} " + " ".join(
            f"{m:+.4f} +- {se:.4f} (n={n:>4})" for m, se, n in cells.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
