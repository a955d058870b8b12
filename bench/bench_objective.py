"""Benchmark one SDPO update: our objective against the straightforward path, same run, same batches.

One update = score y under x with gradient and under xo without (teacher), loss, backward.
  ours             sdpo_objective.sdpo_loss as shipped: teacher under no_grad, only response
                   positions through the LM head, in chunks of `--chunk-size` positions, the
                   head's gradient formed in the forward (fused LM head, 4 head products per row).
  checkpointed     the same with `fused_lm_head=False`: chunks under activation checkpointing
                   (6 head products per row); the path before the fused head, kept as a yardstick.
  straightforward  bench_common.straightforward_loss: two full forwards with logits over all
                   positions and a full-vocabulary float32 log-softmax (the yardstick).
  trl              bench/peers.py: TRL's SDPO trainer (two full forwards keeping |y| + 1 logits,
                   then TRL's own trl.experimental.sdpo loss functions; sampled-token mode for
                   simple_signal); present when trl.experimental.sdpo imports.
  paper            bench/peers.py: the paper repository's updater (replies re-tokenised from
                   text, full logits, full-vocabulary log-softmax of student and teacher, no chunking).
  floor            bench_common.floor_loss: the backbone (forward + backward over x+y, no-grad
                   forward over xo+y) and the 4 LM-head products per response row, nothing else.
Before anything is timed, ours and checkpointed must agree with the yardstick on loss and gradients
(bench_common.check_equivalence, small fp32 model), and on every case every path but the floor must
give the yardstick's loss on that case's own model and batch (check_case_losses). `--no-peers`
runs ours, checkpointed and the yardstick only.

Grid: batch size x context length x response length x vocabulary (the Qwen3 vocabulary,
151,936, with responses up to 2,048 tokens) on a Qwen3 of small hidden size (64, 2 layers),
so the LM head and the log-softmax dominate, as they do for small real models.

Measured per case, mode and path:
  time      median wall time of the timed updates (1-3 per case, `--repeats`) after one
            warm-up; the paths run back to back within each repeat (order alternating), and
            the time ratio is the median of these paired ratios, so that load from other
            processes on a shared machine hits both alike. CPU time of the process (user +
            system) is kept too: on a loaded machine it is the steadier measure of work.
  peak mem  peak memory allocated for tensors during one update, above what was allocated
            before it (model, batch). CUDA: torch.cuda.max_memory_allocated. CPU: the running
            sum of PyTorch CPU-allocator events recorded by torch.profiler(profile_memory=True)
            during the warm-up update (see bench_common.PeakMemory): exact, allocator-level and
            independent of glibc returning pages; RSS growth (kernel VmHWM, reset per update)
            is reported alongside as a cross-check of what the OS had to supply.

Output: a table, then `ratio NAME VALUE` lines (ours / straightforward, from this run) for the
headline case (vocabulary 151,936, response length 1,024):
  ratio peak_memory_<mode>, ratio update_time_<mode>, ratio update_cpu_time_<mode>
  for mode simple_signal and full_distillation, then the same six with suffix _r2048 for
  the longest response (full grid only), then ratio update_time_<mode>_fused_vs_checkpointed
  (ours / checkpointed, headline case), then ours against the peers and the floor (headline case):
  ratio {update_time,update_cpu_time,peak_memory,peak_rss}_vs_{trl,paper}_<mode>,
  ratio {update_time,update_cpu_time}_vs_floor_<mode>.
--out FILE writes every number as JSON.

    python bench/bench_objective.py [--quick | --tiny] [--chunk_size N] [--no-peers] [--device cpu|cuda]
                                    [--out results.json]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from bench_common import (
    LOSS_FUNCTIONS, LOSS_MODES, PATHS, QWEN3_VOCAB, PeakMemory, RssPeak, check_equivalence, environment_lines,
    floor_loss, format_table, median, qwen3_model, random_batches, spread_logits, synchronize,
)
from peers import paper_loss, text_batch, trl_available, trl_loss, word_tokenizer
from tqdm import tqdm

from auxiliary.runtime.io_utils import atomic_write_json
from sdpo_objective import ObjectiveOptions, resolve_chunk_size

# (batch, context, response, vocabulary, timed repeats); the case with V=151,936 and R=1,024 is
# the headline of the ratio lines. Repeats are spent where the goals are measured, so the full
# grid stays within a few minutes on 2 CPU cores.
FULL_GRID = [
    (1, 512, 1024, QWEN3_VOCAB, 3),
    (1, 256, 2048, QWEN3_VOCAB, 1),
    (2, 1024, 512, 32_768, 1),
]
QUICK_GRID = [
    (1, 512, 1024, QWEN3_VOCAB, 2),
    (2, 256, 256, 32_768, 1),
]
TINY_GRID = [  # smoke test: seconds, not a measurement
    (1, 32, 64, 2_048, 1),
    (2, 16, 32, 1_024, 1),
]
HEADLINE = dict(response=1024, vocab=QWEN3_VOCAB)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="two cases (headline + a small one)")
    size.add_argument("--tiny", action="store_true", help="tiny vocabulary and lengths (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed updates per case, mode and path (default: per case, 1-3)")
    parser.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=int,
                        default=None,
                        help="logits_chunk_size of our path (default: the objective's default for --device)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads stall "
                             "at every barrier while another process holds a core; 0 = torch's choice)")
    parser.add_argument("--out", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the TRL and paper-updater paths and the floor (ours, checkpointed, yardstick only)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    args.chunk_size = resolve_chunk_size(args.chunk_size, args.device)
    return args


PEERS = ("trl", "paper")  # the update as others compute it (bench/peers.py)
FLOOR = "floor"  # the backbone and the LM-head products alone (bench_common.floor_loss)
# Every path's loss against the yardstick's, on the benchmark's own model and batch: |a - b| <= rtol |b| + atol.
# Random weights give a teacher and student that nearly agree: at V=151,936, A_t = log p_xo - log p_x
# is ~3e-3 while each log-prob is ~-12 and rounds by ~1e-6 in float32, so two exact methods that
# compute the head over other shapes (TRL keeps |y| + 1 logits) differ by ~3e-4 relative; a wrong
# reduction, shift or sign differs by O(1). atol: TRL forms the tail bucket as log(1 - P_topk).
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-7


def bench_paths(args) -> tuple[str, ...]:
    if args.no_peers:
        return PATHS
    return PATHS + tuple(p for p in PEERS if p != "trl" or trl_available()) + (FLOOR,)


def case_loss_functions(paths, vocab, batch_x, batch_xo) -> dict:
    """path -> loss_fn(model, batch_x, batch_xo, opts) for one case; the paper path gets its text batch here."""
    functions = {path: LOSS_FUNCTIONS[path] for path in paths if path in LOSS_FUNCTIONS}
    if "trl" in paths:
        functions["trl"] = trl_loss
    if "paper" in paths:
        tokenizer = word_tokenizer(vocab)
        texts = text_batch(tokenizer, batch_x, batch_xo)  # the replies as text, as the paper's updater receives them
        functions["paper"] = lambda model, _x, _xo, opts: paper_loss(model, tokenizer, texts, opts,
                                                                     device=batch_x.input_ids.device)
    if FLOOR in paths:
        functions[FLOOR] = floor_loss
    return functions


def one_update(model, loss_fn, batch_x, batch_xo, opts) -> float:
    loss = loss_fn(model, batch_x, batch_xo, opts)
    loss.backward()
    return float(loss.detach())


def check_case_losses(losses: dict, label: str) -> None:
    """Every path but the floor computes the yardstick's loss on this case's model and batch, or nothing is timed."""
    reference = losses.get("straightforward")
    if reference is None:
        return
    for path, value in losses.items():
        if path == FLOOR or value is None:
            continue
        if not abs(value - reference) <= LOSS_RTOL * abs(reference) + LOSS_ATOL:
            raise AssertionError(f"{label}: loss {value} ({path}) vs {reference} (straightforward)")


def run_case(case, args, dtype, progress, paths=PATHS, loss_functions=None) -> list[dict]:
    """All modes and paths for one grid point; one row per (mode, path).

    loss_functions: path -> loss_fn for paths of the caller's own (default: case_loss_functions).
    """
    batch_size, context, response, vocab, repeats = case
    repeats = args.repeats or repeats
    device = args.device
    # spread logits: the equal-loss check below compares real KLs and signals, not rounding noise
    model = spread_logits(qwen3_model(vocab, args.hidden_size, args.layers, seed=0, device=device, dtype=dtype))
    batch_x, batch_xo = random_batches(batch_size, context, response, vocab, seed=1, device=device)
    loss_functions = loss_functions or case_loss_functions(paths, vocab, batch_x, batch_xo)
    rows = []
    for mode in LOSS_MODES:
        opts = ObjectiveOptions(loss_mode=mode, logits_chunk_size=args.chunk_size)
        result = {path: {"times": [], "cpu_times": [], "rss": [], "error": None, "loss": None} for path in paths}

        def attempt(path, measure):
            """One update of `path`; an out-of-memory error is recorded for the path, not raised."""
            if result[path]["error"]:
                return
            model.zero_grad(set_to_none=True)
            try:
                measure(lambda: one_update(model, loss_functions[path], batch_x, batch_xo, opts))
            except torch.OutOfMemoryError as error:
                result[path]["error"] = "OOM: " + str(error).split("\n")[0][:80]
            finally:
                model.zero_grad(set_to_none=True)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()

        def measure_memory(update, path):
            with PeakMemory(device) as meter:  # doubles as the warm-up on CPU (profiled, never timed)
                result[path]["loss"] = update()
            result[path]["peak"] = meter.peak

        def measure_time(update, path):
            rss = RssPeak() if torch.device(device).type == "cpu" else None
            synchronize(device)
            with (rss or _Nothing()):
                wall, cpu = time.perf_counter(), time.process_time()
                update()
                synchronize(device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            result[path]["times"].append(wall)
            result[path]["cpu_times"].append(cpu)
            if rss is not None and rss.peak is not None:
                result[path]["rss"].append(rss.peak)

        for path in paths:
            attempt(path, lambda update, p=path: measure_memory(update, p))
            progress.update(1)
        check_case_losses({p: r["loss"] for p, r in result.items()}, f"{case[:4]} {mode}")
        for repeat in range(repeats):
            for path in (paths if repeat % 2 == 0 else paths[::-1]):
                attempt(path, lambda update, p=path: measure_time(update, p))
                progress.update(1)
        for path in paths:
            entry = result[path]
            rows.append({
                "batch": batch_size, "context": context, "response": response, "vocab": vocab, "mode": mode,
                "path": path, "time_s": median(entry["times"]), "cpu_time_s": median(entry["cpu_times"]),
                "times_s": entry["times"], "cpu_times_s": entry["cpu_times"],
                "peak_bytes": entry.get("peak") if not entry["error"] else None,
                "rss_peak_bytes": max(entry["rss"]) if entry["rss"] else None, "error": entry["error"],
                "loss": entry["loss"], "tokens": int(batch_x.response_mask.sum()),
            })
    model = None  # release the weights before the next case
    return rows


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ours against each of these, besides the yardstick: (path, suffix of the ratio names)
OURS_VERSUS = (("checkpointed", "vs_checkpointed"), ("trl", "vs_trl"), ("paper", "vs_paper"), (FLOOR, "vs_floor"))


def ratios(rows) -> dict[tuple, dict[str, float]]:
    """Each path / straightforward per (case, mode), and ours / each other path (`<metric>_vs_<path>`).

    Times: the median over repeats of the paired ratio (the two paths ran back to back in the
    same repeat), so that a slow drift in the machine's load cancels. Memory: plain ratio.
    """
    by_key = {}
    for row in rows:
        by_key.setdefault((row["batch"], row["context"], row["response"], row["vocab"], row["mode"]),
                          {})[row["path"]] = row
    out = {}
    for key, paths in by_key.items():
        for path, row in paths.items():
            if path != "straightforward":
                out[key + (path,)] = _versus(row, paths["straightforward"])
        for other, suffix in OURS_VERSUS:
            if other in paths:
                for metric, value in _versus(paths["ours"], paths[other]).items():
                    out[key + ("ours",)][f"{metric}_{suffix}"] = value
    return out


def _versus(row, other) -> dict[str, float]:
    return {
        "update_time": paired_ratio(row["times_s"], other["times_s"]),
        "update_cpu_time": paired_ratio(row["cpu_times_s"], other["cpu_times_s"]),
        "peak_memory": safe_ratio(row["peak_bytes"], other["peak_bytes"]),
        "peak_rss": safe_ratio(row["rss_peak_bytes"], other["rss_peak_bytes"]),
    }


def paired_ratio(ours: list[float], straight: list[float]) -> float:
    pairs = [a / b for a, b in zip(ours, straight) if b > 0]
    return median(pairs) if pairs and len(ours) == len(straight) else float("nan")


def safe_ratio(numerator, denominator) -> float:
    if numerator is None or denominator is None or not denominator or math.isnan(numerator) or math.isnan(denominator):
        return float("nan")
    return numerator / denominator


def headline_lines(per_case: dict, grid) -> list[str]:
    """`ratio NAME VALUE` lines: the headline case, the longest response at the Qwen3 vocabulary, then ours vs
    others."""
    vocab = max(case[3] for case in grid)
    headline = [c for c in grid if c[2] == HEADLINE["response"] and c[3] == HEADLINE["vocab"]]
    headline = headline[0] if headline else max(grid, key=lambda c: (c[3], c[2]))
    longest = max((c for c in grid if c[3] == vocab), key=lambda c: c[2])
    lines = []
    for case, suffix in ((headline, ""), (longest, f"_r{longest[2]}")):
        if suffix and case == headline:
            continue
        for metric in ("peak_memory", "update_time", "update_cpu_time"):
            for mode in LOSS_MODES:
                value = per_case[tuple(case[:4]) + (mode, "ours")][metric]
                lines.append(f"ratio {metric}_{mode}{suffix} {value:.4f}")
    for mode in LOSS_MODES:
        value = per_case[tuple(headline[:4]) + (mode, "ours")].get("update_time_vs_checkpointed", float("nan"))
        lines.append(f"ratio update_time_{mode}_fused_vs_checkpointed {value:.4f}")
    ours = {mode: per_case[tuple(headline[:4]) + (mode, "ours")] for mode in LOSS_MODES}
    for peer in ("trl", "paper"):
        for metric in ("update_time", "update_cpu_time", "peak_memory", "peak_rss"):
            for mode in LOSS_MODES:
                name = f"{metric}_vs_{peer}"
                if name in ours[mode]:
                    lines.append(f"ratio {name}_{mode} {ours[mode][name]:.4f}")
    for metric in ("update_time", "update_cpu_time"):
        for mode in LOSS_MODES:
            if f"{metric}_vs_floor" in ours[mode]:
                lines.append(f"ratio {metric}_vs_floor_{mode} {ours[mode][f'{metric}_vs_floor']:.4f}")
    return lines


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    grid = TINY_GRID if args.tiny else QUICK_GRID if args.quick else FULL_GRID

    started = time.time()
    for line in environment_lines(args.device):
        print(line)
    print(f"model: Qwen3 hidden {args.hidden_size}, {args.layers} layers, {dtype}; chunk size {args.chunk_size}; "
          f"threads {torch.get_num_threads()}; load average at start {_load()}")

    torch.backends.cuda.matmul.allow_tf32 = False  # the check compares fp32 numbers
    check = check_equivalence(args.device)
    for mode, (loss_ours, loss_straight, grad_diff) in check.items():
        print(f"equivalence {mode}: loss {loss_ours:.6f} vs {loss_straight:.6f}, "
              f"max relative gradient difference {grad_diff:.1e}")

    rows = []
    paths = bench_paths(args)
    steps = sum(len(LOSS_MODES) * len(paths) * (1 + (args.repeats or case[4])) for case in grid)
    with tqdm(total=steps, desc="updates", file=sys.stderr, disable=None) as progress:
        for case in grid:
            rows.extend(run_case(case, args, dtype, progress, paths))
    per_case = ratios(rows)

    table = []
    for row in rows:
        key = (row["batch"], row["context"], row["response"], row["vocab"], row["mode"], row["path"])
        is_ours = row["path"] != "straightforward"
        table.append([row["batch"], row["context"], row["response"], row["vocab"], row["mode"], row["path"],
                      "-" if row["loss"] is None or row["path"] == FLOOR else f"{row['loss']:.6g}",
                      row["error"] or f"{row['time_s']:.3f}", f"{row['cpu_time_s']:.3f}", mib(row["peak_bytes"]),
                      mib(row["rss_peak_bytes"]),
                      f"{per_case[key]['update_time']:.2f}" if is_ours else "",
                      f"{per_case[key]['peak_memory']:.2f}" if is_ours else ""])
    print()
    print(format_table(["B", "C", "R", "V", "mode", "path", "loss", "time s", "cpu s", "peak MiB", "rss MiB",
                        "time x", "mem x"], table))
    elapsed = time.time() - started
    print(f"\nelapsed {elapsed:.0f} s; load average at end {_load()}")
    lines = headline_lines(per_case, grid)
    if args.out:
        atomic_write_json(args.out, {
            "environment": environment_lines(args.device), "dtype": str(dtype), "hidden_size": args.hidden_size,
            "layers": args.layers, "chunk_size": args.chunk_size, "threads": torch.get_num_threads(), "paths": paths,
            "equivalence": {m: list(v) for m, v in check.items()}, "rows": rows, "elapsed_s": elapsed,
            "ratios": {line.split()[1]: float(line.split()[2]) for line in lines},
        })
    for line in lines:
        print(line)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
