"""Which `logits_chunk_size` suits this device: our update at the headline shape for several chunk sizes.

One update of `sdpo_loss` as shipped (fused LM head) per chunk size and loss mode, on the model
and batch of bench_objective's headline case (batch 1, context 512, response 1,024, vocabulary
151,936; Qwen3 hidden 64, 2 layers), measured as bench_objective measures (bench_objective.run_case):
peak memory from the profiled warm-up, then `--repeats` timed rounds with every chunk size back
to back (order alternating), time ratios as medians of the paired ratios. All chunk sizes must
give the same loss before anything is timed.

Output: a table, the fastest chunk size per mode, then ratio lines against the ObjectiveOptions
default (256):
    ratio update_time_chunk<N>_vs_chunk<default>_<mode> VALUE
    ratio peak_memory_chunk<N>_vs_chunk<default>_<mode> VALUE

    python bench/bench_chunk_size.py [--sizes 16,32,64,128,256] [--repeats 3] [--tiny] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from bench_common import LOSS_MODES, QWEN3_VOCAB, environment_lines, format_table, ours_loss
from bench_objective import mib, paired_ratio, run_case, safe_ratio
from tqdm import tqdm

from sdpo_objective import resolve_chunk_size

HEADLINE_CASE = (1, 512, 1024, QWEN3_VOCAB)
TINY_CASE = (1, 32, 96, 2_048)
DEFAULT_SIZES = (16, 32, 64, 128, 256)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma list of chunk sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny vocabulary and lengths (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(size) for size in args.sizes.split(",")})
    except ValueError:
        parser.error(f"--sizes must be a comma list of integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1 or args.repeats < 1:
        parser.error("chunk sizes and --repeats must be >= 1")
    # run_case reads these bench_objective options
    args.hidden_size, args.layers, args.chunk_size = 64, 2, resolve_chunk_size(None, args.device)
    return args


def chunk_path(size: int) -> str:
    return f"chunk{size}"


def with_chunk(size: int):
    return lambda model, batch_x, batch_xo, opts: ours_loss(
        model, batch_x, batch_xo, dataclasses.replace(opts, logits_chunk_size=size))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    case = (TINY_CASE if args.tiny else HEADLINE_CASE) + (args.repeats,)
    baseline = resolve_chunk_size(None, args.device)  # the objective's default on this device
    sizes = sorted(set(args.sizes) | {baseline})
    paths = tuple(chunk_path(size) for size in sizes)
    for line in environment_lines(args.device):
        print(line)
    print(f"case: batch {case[0]}, context {case[1]}, response {case[2]}, vocabulary {case[3]}; {dtype}; "
          f"chunk sizes {sizes}; {args.repeats} timed rounds")
    started = time.time()
    with tqdm(total=len(LOSS_MODES) * len(paths) * (1 + args.repeats), desc="updates", file=sys.stderr,
              disable=None) as progress:
        rows = run_case(case, args, dtype, progress, paths, {chunk_path(s): with_chunk(s) for s in sizes})
    for mode in LOSS_MODES:
        losses = [row["loss"] for row in rows if row["mode"] == mode]
        if max(losses) - min(losses) > 1e-5 * max(abs(v) for v in losses) + 1e-9:
            raise AssertionError(f"{mode}: chunk sizes give different losses {losses}")

    by_mode = {mode: {row["path"]: row for row in rows if row["mode"] == mode} for mode in LOSS_MODES}
    table, lines = [], []
    for mode, by_path in by_mode.items():
        base = by_path[chunk_path(baseline)]
        for size in sizes:
            row = by_path[chunk_path(size)]
            time_x = paired_ratio(row["times_s"], base["times_s"])
            memory_x = safe_ratio(row["peak_bytes"], base["peak_bytes"])
            table.append([mode, size, f"{row['time_s']:.3f}", f"{row['cpu_time_s']:.3f}", mib(row["peak_bytes"]),
                          mib(row["rss_peak_bytes"]), f"{time_x:.2f}", f"{memory_x:.3f}"])
            if size != baseline:
                lines.append(f"ratio update_time_chunk{size}_vs_chunk{baseline}_{mode} {time_x:.4f}")
                lines.append(f"ratio peak_memory_chunk{size}_vs_chunk{baseline}_{mode} {memory_x:.4f}")
    print()
    print(format_table(["mode", "chunk", "time s", "cpu s", "peak MiB", "rss MiB", "time x", "mem x"], table))
    for mode, by_path in by_mode.items():
        fastest = min(sizes, key=lambda size: by_path[chunk_path(size)]["time_s"])
        print(f"fastest chunk size ({mode}): {fastest}")
    print(f"elapsed {time.time() - started:.0f} s")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
