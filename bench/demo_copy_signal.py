"""Does the centred hindsight signal favour tokens that repeat the reply's own earlier words? (issue #18)

For the step-0 evaluation replies of an online run (the initial policy's), the per-token signal
A_t = log p(y_t | x, o) - log p(y_t | x) is computed under the run's first follow-up of its user and
under the placebo's "OK, thanks.", centred per reply after the first `--ignore_first_k` tokens (as
the demo trains). Tokens are split into copy tokens (the trigram ending at the token already
occurred earlier in the same reply) and the others; the mean centred A of each group is printed with
its standard error. A positive mean on copy tokens under both follow-ups means the update pushes
repetition up whatever the user said: the drift both arms of `make demo` show.

    .venv/bin/python bench/demo_copy_signal.py /tmp/sdpo_runs/demo-<time> [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PLACEBO_FOLLOWUP = "OK, thanks."


def copy_tokens(ids: list[int], start: int) -> list[bool]:
    """For positions start.. of `ids`: whether the trigram ending there occurred earlier in `ids`."""
    flags = []
    for t in range(start, len(ids)):
        gram = tuple(ids[t - 2:t + 1]) if t >= 2 else None
        flags.append(gram is not None and any(tuple(ids[j - 2:j + 1]) == gram for j in range(2, t)))
    return flags


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an eval_online_sdpo.py output folder")
    parser.add_argument("--model", default=None, help="default: the run's resolved model path")
    parser.add_argument("--ignore_first_k", type=int, default=None, help="default: the run's")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_objective import compute_signal, hindsight_messages, render_context_ids

    config = json.loads((args.run / "config.json").read_text())
    model_path = args.model or config["resolved"]["model_path"]
    ignore_first_k = config["sdpo"]["ignore_first_k"] if args.ignore_first_k is None else args.ignore_first_k
    first = json.loads((args.run / "metrics.jsonl").read_text().splitlines()[0])
    followups = {"user": first["feedback"]["followup"], "placebo": PLACEBO_FOLLOWUP}
    records = [json.loads(line) for line in (args.run / "completions.jsonl").read_text().splitlines()]
    replies = [r for r in records if r["step"] == 0 and r["phase"] == "eval" and r["arm"] == "feedback"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    print(f"{len(replies)} step-0 eval replies of {args.run}; ignore_first_k {ignore_first_k}")
    for name, followup in followups.items():
        groups = {"copy": [], "other": []}
        for record in replies:
            messages = [{"role": "user", "content": record["prompt"]}]
            ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            contexts = ([render_context_ids(tokenizer, messages)],
                        [render_context_ids(tokenizer, hindsight_messages(messages, followup))])
            signal = compute_signal(model, *contexts, [ids], tokenizer.pad_token_id or 0)[0]["signal"]
            for value, is_copy in zip(centred(signal, ignore_first_k), copy_tokens(ids, ignore_first_k)):
                groups["copy" if is_copy else "other"].append(value)
        parts = []
        for group, values in groups.items():
            mean, se = mean_and_se(values)
            parts.append(f"{group} tokens n={len(values)} mean centred A {mean:+.4f} +- {se:.4f}")
        print(f"follow-up {name} ({followup!r}): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
