"""Where one update's time goes: our update and the floor under torch.profiler, by kind of work.

Same model and batch as bench_objective's headline case (batch 1, context 512, response 1,024,
vocabulary 151,936; Qwen3 hidden 64, 2 layers; `--tiny` for a smoke run). One profiled update
per path after one warm-up; operators are grouped by their own (self) CPU time:
  head products        matrix products with a vocabulary-sized operand (h W^T, G W, G^T h)
  vocabulary passes    every other operator on a [rows, V] tensor (log-softmax, top-k, exp,
                       scatter, ...), listed one by one
  backbone and rest    everything else (the transformer layers, their backward, bookkeeping)
The profiler adds overhead per operator, so the shares, not the seconds, are the result;
bench_objective's timings are the unprofiled ones. Prints a table and, last, one line per path:
    share <path> head_products=X vocabulary_passes=Y backbone_and_rest=Z

    python bench/bench_breakdown.py [--tiny] [--chunk-size N] [--hidden-size 64] [--top 8]
"""
from __future__ import annotations

import argparse
import sys

import torch
from bench_common import (QWEN3_VOCAB, environment_lines, floor_loss, format_table, ours_loss, qwen3_model,
                          random_batches)

from sdpo_objective import ObjectiveOptions, resolve_chunk_size

MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear"}
PATHS = {"ours full_distillation": ("full_distillation", ours_loss), "ours simple_signal": ("simple_signal", ours_loss),
         "floor": ("full_distillation", floor_loss)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny vocabulary and lengths (smoke test)")
    parser.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=int,
                        default=None, help="default: the objective's CPU default")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size of the 2-layer Qwen3")
    parser.add_argument("--top", type=int, default=8, help="vocabulary-pass operators listed per path")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.chunk_size = resolve_chunk_size(args.chunk_size, "cpu")
    return args


def kind_of(name: str, shapes, vocab: int) -> str:
    """A product with any vocabulary-sized dimension is a head product; another operator is a vocabulary
    pass when an input has the vocabulary as its last dimension ([rows, V]: logits and their kin), not
    when it is a [V, H] weight (embedding lookup and its gradient: backbone work that every path does)."""
    shapes = [dims for dims in shapes if isinstance(dims, (list, tuple)) and dims]
    if name in MATRIX_PRODUCTS and any(vocab in dims for dims in shapes):
        return "head_products"
    if any(dims[-1] == vocab for dims in shapes):
        return "vocabulary_passes"
    return "backbone_and_rest"


def profile_update(model, loss_fn, batch_x, batch_xo, opts, vocab) -> dict:
    """{kind: seconds} and {vocabulary-pass operator: seconds} of one update's self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    loss_fn(model, batch_x, batch_xo, opts).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss_fn(model, batch_x, batch_xo, opts).backward()
    model.zero_grad(set_to_none=True)
    kinds, passes = {"head_products": 0.0, "vocabulary_passes": 0.0, "backbone_and_rest": 0.0}, {}
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        kind = kind_of(event.key, event.input_shapes or [], vocab)
        kinds[kind] += seconds
        if kind == "vocabulary_passes":
            passes[event.key] = passes.get(event.key, 0.0) + seconds
    return {"kinds": kinds, "passes": passes}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size, context, response, vocab = (1, 32, 96, 2_048) if args.tiny else (1, 512, 1024, QWEN3_VOCAB)
    for line in environment_lines("cpu"):
        print(line)
    print(f"case: batch {batch_size}, context {context}, response {response}, vocabulary {vocab}; "
          f"chunk size {args.chunk_size}; hidden size {args.hidden_size}")
    model = qwen3_model(vocab, args.hidden_size, 2, seed=0)
    batch_x, batch_xo = random_batches(batch_size, context, response, vocab, seed=1)
    results = {path: profile_update(model, fn, batch_x, batch_xo,
                                    ObjectiveOptions(loss_mode=mode, logits_chunk_size=args.chunk_size), vocab)
               for path, (mode, fn) in PATHS.items()}
    rows = []
    for path, result in results.items():
        total = sum(result["kinds"].values())
        for kind, seconds in result["kinds"].items():
            rows.append([path, kind, f"{seconds:.3f}", f"{seconds / total:.0%}"])
        for name, seconds in sorted(result["passes"].items(), key=lambda item: -item[1])[:args.top]:
            rows.append([path, f"  {name}", f"{seconds:.3f}", f"{seconds / total:.0%}"])
        rows.append([path, "total (profiled)", f"{total:.3f}", "100%"])
    print()
    print(format_table(["path", "work", "self CPU s", "share"], rows))
    for path, result in results.items():
        total = sum(result["kinds"].values())
        print(f"share {path.replace(' ', '_')} " + " ".join(f"{k}={v / total:.3f}" for k, v in result["kinds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
