"""What the exact tail bucket costs on the fused LM head: full_distillation with the tail bucket vs without.

    OMP_NUM_THREADS=1 python bench/bench_tail_bucket.py [--rows 512] [--hidden 64] [--vocab 151936] [--repeats 5]

Times sdpo_fused_head.fused_head_loss alone (loss and the head's gradients, formed in its forward)
on random hidden states and a random head at the Qwen3 vocabulary: the LM-head work is all that
differs between the two settings, so a small hidden size keeps the backbone-free case honest (the
elementwise passes over [rows, V] dominate, as they do for the response rows of a real update).
Each repeat runs both settings back to back; the ratio is the median over repeats of the paired
ratios, so that load from other processes on the machine cancels.

Output: a table, then `ratio tail_bucket_exact_vs_plain <x>` (exact tail / renormalised top-k).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench_common import QWEN3_VOCAB, environment_lines, format_table, median  # noqa: E402
from sdpo_fused_head import fused_head_loss  # noqa: E402
from sdpo_objective import ObjectiveOptions, HeadLogits, TokenLoss  # noqa: E402


class _HeadOnly(torch.nn.Module):
    """Just an LM head, as sdpo_objective's chunked head reads it from a model."""

    def __init__(self, hidden: int, vocab: int, seed: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():  # logits with a spread like a trained model's (top-k mass from ~0.3 to ~1)
            self.head.weight.normal_(0.0, 4.0 / hidden ** 0.5, generator=torch.Generator().manual_seed(seed))
        self.config = SimpleNamespace(final_logit_softcapping=None, vocab_size=vocab)

    def get_output_embeddings(self):
        return self.head


def time_fused_head(model, hidden_s, hidden_t, targets, tail: bool, chunk: int) -> float:
    rows = hidden_s.shape[0]
    opts = ObjectiveOptions(loss_mode="full_distillation", distillation_tail=tail, logits_chunk_size=chunk)
    plan = TokenLoss(opts, 1, torch.zeros(rows, dtype=torch.long), torch.ones(rows), torch.full((rows,), float(rows)))
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss, _, _, _ = fused_head_loss(HeadLogits(model), plan, hidden_s, hidden_t, targets, chunk)
    loss.backward()
    return time.perf_counter() - started


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    model = _HeadOnly(args.hidden, args.vocab, seed=0)
    generator = torch.Generator().manual_seed(1)
    hidden_s = torch.randn(args.rows, args.hidden, generator=generator).requires_grad_(True)
    hidden_t = hidden_s.detach() + 0.3 * torch.randn(args.rows, args.hidden, generator=generator)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=generator)
    time_fused_head(model, hidden_s, hidden_t, targets, True, args.chunk)  # warm-up: allocator, kernels
    times = {True: [], False: []}
    for repeat in range(args.repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)
        for tail in order:
            times[tail].append(time_fused_head(model, hidden_s, hidden_t, targets, tail, args.chunk))
    ratio = median([a / b for a, b in zip(times[True], times[False])])
    print("\n".join(environment_lines("cpu")))
    print(f"rows {args.rows}  hidden {args.hidden}  vocab {args.vocab}  chunk {args.chunk}  repeats {args.repeats}")
    print(format_table(["setting", "median s", "min s"],
                       [["exact tail bucket", f"{median(times[True]):.3f}", f"{min(times[True]):.3f}"],
                        ["renormalised top-k (plain)", f"{median(times[False]):.3f}", f"{min(times[False]):.3f}"]]))
    print(f"ratio tail_bucket_exact_vs_plain {ratio:.4f}")
    return {"tail_bucket_exact_vs_plain": ratio}


if __name__ == "__main__":
    main()
