"""What the contrastive signal, the copy guard and the end signal cost: one update (sdpo_loss forward + backward)
with each option against the same update without it, per loss mode, on the embedded SmolLM2-135M-Instruct.

    OMP_NUM_THREADS=2 python bench/bench_options.py [--model smollm2-135m-instruct] [--batch 1]
        [--context 80] [--response 96] [--repeats 5]

The batch is random token ids (contexts of `--context` tokens, xo with 40 more, x o_neutral with 12 more,
replies of `--response` tokens), the model in train mode, the fused LM head as shipped. Each repeat runs
every setting back to back in an alternating order; a ratio is the median over repeats of the paired
ratios, so that load from other processes on the machine cancels.

Output: a table, then `ratio <option>_vs_plain_<mode> <x>` for contrast and copy_guard in both loss modes and
end_signal in simple_signal (the only mode that has it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench_common import environment_lines, format_table, median  # noqa: E402
from sdpo_objective import ObjectiveOptions, build_scoring_batch, sdpo_loss  # noqa: E402

SETTINGS = {"plain": {}, "contrast": {"contrast_followup": "OK."}, "copy_guard": {"copy_guard_ngram": 3},
            "end_signal": {"end_signal_weight": 1.0}}
SIMPLE_SIGNAL_ONLY = {"end_signal"}


def batches(vocab: int, batch: int, context: int, response: int, pad: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(10, vocab, (length,), generator=generator).tolist()

    contexts = [ids(context) for _ in range(batch)]
    replies = [ids(response) for _ in range(batch)]
    return {"x": build_scoring_batch(contexts, replies, pad),
            "xo": build_scoring_batch([c + ids(40) for c in contexts], replies, pad),
            "neutral": build_scoring_batch([c + ids(12) for c in contexts], replies, pad)}


def time_update(model, scoring, opts: ObjectiveOptions) -> float:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss, _ = sdpo_loss(model, scoring["x"], scoring["xo"], opts,
                        batch_neutral=scoring["neutral"] if opts.contrast_followup else None)
    loss.backward()
    return time.perf_counter() - started


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=80)
    parser.add_argument("--response", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from auxiliary.runtime.model_loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(args.model, "fp32", "sdpa", "cpu")
    model.train()
    scoring = batches(model.config.vocab_size, args.batch, args.context, args.response, tokenizer.pad_token_id or 0)
    rows, ratios = [], {}
    for mode in ("simple_signal", "full_distillation"):
        options = {name: ObjectiveOptions(loss_mode=mode, **extra) for name, extra in SETTINGS.items()
                   if mode == "simple_signal" or name not in SIMPLE_SIGNAL_ONLY}
        time_update(model, scoring, options["contrast"])  # warm-up: allocator, kernels
        times = {name: [] for name in options}
        for repeat in range(args.repeats):
            order = list(options) if repeat % 2 == 0 else list(options)[::-1]
            for name in order:
                times[name].append(time_update(model, scoring, options[name]))
        for name in options:
            rows.append([mode, name, f"{median(times[name]):.3f}", f"{min(times[name]):.3f}"])
            if name != "plain":
                ratios[f"{name}_vs_plain_{mode}"] = median([a / b for a, b in zip(times[name], times["plain"])])
    print("\n".join(environment_lines("cpu")))
    print(f"model {args.model}  batch {args.batch}  context {args.context}  response {args.response}  "
          f"repeats {args.repeats}  threads {torch.get_num_threads()}  OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(format_table(["loss mode", "setting", "median s", "min s"], rows))
    for name, value in ratios.items():
        print(f"ratio {name} {value:.4f}")
    return ratios


if __name__ == "__main__":
    main()
